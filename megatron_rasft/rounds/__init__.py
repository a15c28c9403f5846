"""The rollout rounds: one round per window of problems (export → refresh → sample → verify →
weigh → result), rank coordination, and rounds that overlap training (`rollout.overlap`)."""
