"""The real-model study (issue #29, docs/results.md "Protocol"): arms × seeds on SmolLM2-135M-Instruct,
resumable, within a time budget, with committed per-run summaries and a report regenerated from them."""
