"""The memory and overlap settings (recomputation, overlapped gradient reduce / parameter gather,
bucket size, reference placement): every invalid combination is refused when the configuration is
built, with one line naming the settings; the valid ones load and reach Megatron's configs."""
import pytest

from megatron_rasft.config import ConfigError, load_config


@pytest.mark.parametrize("sets, msg", [
    (["model.recompute_granularity=everything"],
     "model.recompute_granularity must be one of (None, 'selective', 'full'), got 'everything'"),
    (["model.recompute_granularity=full"],
     "model.recompute_granularity = 'full' needs model.recompute_method = 'uniform' or 'block', got None"),
    (["model.recompute_granularity=full", "model.recompute_method=sometimes", "model.recompute_num_layers=1"],
     "model.recompute_granularity = 'full' needs model.recompute_method = 'uniform' or 'block', got 'sometimes'"),
    (["model.recompute_granularity=full", "model.recompute_method=uniform"],
     "model.recompute_granularity = 'full' needs model.recompute_num_layers in [1, model.num_layers = 2], got None"),
    (["model.recompute_granularity=full", "model.recompute_method=block", "model.recompute_num_layers=3"],
     "model.recompute_granularity = 'full' needs model.recompute_num_layers in [1, model.num_layers = 2], got 3"),
    (["model.recompute_granularity=selective", "model.recompute_method=uniform"],
     "model.recompute_method and model.recompute_num_layers apply to model.recompute_granularity = 'full' only"),
    (["model.recompute_num_layers=1"],
     "model.recompute_method and model.recompute_num_layers apply to model.recompute_granularity = 'full' only"),
    (["model.recompute_modules=[\"mlp\"]"],
     "model.recompute_modules applies to model.recompute_granularity = 'selective' only (got None)"),
    (["model.recompute_granularity=full", "model.recompute_method=uniform", "model.recompute_num_layers=1",
      "model.recompute_modules=[\"mlp\"]"],
     "model.recompute_modules applies to model.recompute_granularity = 'selective' only (got 'full')"),
    (["model.recompute_granularity=selective", "model.recompute_modules=[\"moe\"]"],
     "model.recompute_modules must be a non-empty list of ('core_attn', 'mlp', 'layernorm'), got ['moe']"),
    (["model.recompute_granularity=selective", "model.recompute_modules=[]"],
     "model.recompute_modules must be a non-empty list of"),
    (["model.recompute_modules=\"mlp\""], "model.recompute_modules must be a list or null, got 'mlp'"),
    (["parallel.overlap_param_gather=true", "parallel.use_distributed_optimizer=false",
      "parallel.overlap_grad_reduce=true"],
     "parallel.overlap_param_gather = true needs parallel.use_distributed_optimizer = true"),
    (["parallel.overlap_param_gather=true"],
     "parallel.overlap_param_gather = true needs parallel.overlap_grad_reduce = true"),
    (["parallel.bucket_size=1000"],
     "parallel.bucket_size applies with parallel.overlap_grad_reduce = true only"),
    (["parallel.overlap_grad_reduce=true", "parallel.bucket_size=0"],
     "parallel.bucket_size must be >= 1 (parameters per bucket) or null, got 0"),
    (["parallel.overlap_grad_reduce=yes"], "parallel.overlap_grad_reduce must be a bool, got 'yes'"),
    (["model.reference_placement=disk"],
     "model.reference_placement must be one of ('device', 'host'), got 'disk'"),
    (["model.reference_placement=host", "loss.method=sft_kl"],
     "model.reference_placement = 'host' with loss.method = 'sft_kl': this method uses the frozen reference "
     "inside every training step (its KL term), so the reference must stay on the device"),
    (["model.reference_placement=host", "loss.method=asft"],
     "model.reference_placement = 'host' with loss.method = 'asft': this method uses the frozen reference"),
])
def test_invalid_memory_settings_are_refused(sets, msg):
    with pytest.raises(ConfigError) as e:
        load_config(None, sets)
    assert str(e.value).startswith("--set: " + msg), str(e.value)
    assert "\n" not in str(e.value)


def test_valid_memory_settings_load_and_reach_megatron():
    from megatron_rasft.model.provider import transformer_config

    cfg = load_config(None, ["model.recompute_granularity=full", "model.recompute_method=block",
                             "model.recompute_num_layers=1", "parallel.overlap_grad_reduce=true",
                             "parallel.overlap_param_gather=true", "parallel.bucket_size=100000",
                             "model.reference_placement=host", "loss.method=rasft"])
    tc = transformer_config(cfg.model, cfg.parallel)
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == ("full", "block", 1)
    sel = load_config(None, ["model.recompute_granularity=selective", "model.recompute_modules=[\"core_attn\", \"mlp\"]"])
    tc = transformer_config(sel.model, sel.parallel)
    assert tc.recompute_granularity == "selective" and tc.recompute_modules == ["core_attn", "mlp"]
    assert transformer_config(load_config(None, []).model, sel.parallel).recompute_granularity is None
    assert load_config(None, ["model.reference_placement=host"]).model.reference_placement == "host"
