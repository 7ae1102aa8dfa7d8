"""Configuration errors are caught before any process group, naming key, value and what is allowed."""
import pytest

from trainer.config import ConfigError, RunConfig, config_hash, load_config
from tests.trainer_utils import write_config


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml"), ["optim.lr=3e-4", "student.args.depth=3"], world_size=2)
    assert isinstance(cfg, RunConfig)
    assert cfg.optim.lr == 3e-4 and cfg.student.args["depth"] == 3
    assert cfg.train.micro_batch == 8 and cfg.data.batch_size == 8  # 16 / 2 ranks


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["optim.lrr=1"], r"unknown config key 'optim.lrr'.*allowed here: \[.*'lr'"),
        (["train.steps=ten"], r"train.steps.*ten"),
        (["dynamic.flops_target=1.5"], r"dynamic.flops_target=1.5.*\(0, 1\]"),
        (["dynamic.flops_target=0"], r"dynamic.flops_target=0"),
        (["engine.kind=horovod"], r"engine.kind='horovod'.*one of"),
        (["train.global_batch=10"], r"train.global_batch=10.*divisible by world_size x micro_batch = 4 x"),
        (["train.micro_batch=3"], r"divisible by world_size x micro_batch = 4 x 3"),
        (["data.format=parquet"], r"data.format='parquet'"),
        (["checkpoint.resume=latest"], r"checkpoint.resume='latest'"),
        (["train.preempt_signals=[SIGFOO]"], r"SIGFOO"),
        (["optim"], r"key.sub=value"),
    ],
)
def test_bad_values_name_key_value_and_allowed(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write_config(tmp_path / "c.yaml"), overrides, world_size=4)


def test_teacher_path_required_and_must_exist(tmp_path):
    path = write_config(tmp_path / "c.yaml", teacher={"path": None}, student={"init": "inherit"})
    with pytest.raises(ConfigError, match=r"teacher.path=None.*teacher=null"):
        load_config(path, [], world_size=1)
    with pytest.raises(ConfigError, match=r"teacher.path='/nope/dit.pt'.*no such file"):
        load_config(path, ["teacher.path=/nope/dit.pt"], world_size=1)
    with pytest.raises(ConfigError, match=r"student.init='inherit'.*needs a teacher"):
        load_config(path, ["teacher=null"], world_size=1)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", [], world_size=1)


def test_config_hash_ignores_run_dir(tmp_path):
    path = write_config(tmp_path / "c.yaml")
    a = load_config(path, ["run_dir=/a"], world_size=1)
    b = load_config(path, ["run_dir=/b"], world_size=1)
    c = load_config(path, ["optim.lr=1"], world_size=1)
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_lr_mult_groups_parameters_by_pattern_and_rejects_typos():
    """optim.lr_mult: the first fnmatch pattern sets a parameter's LR multiplier (wrapper prefixes such as
    DDP's `module.` ignored), the routers' multiplier applies on top, a pattern naming nothing is an error."""
    import torch

    from trainer.config import OptimConfig
    from trainer.optim import build_optimizer, param_groups

    net = torch.nn.ModuleDict({"y_embedder": torch.nn.Linear(2, 2), "blocks": torch.nn.ModuleList(
        [torch.nn.ModuleDict({"cross_attn": torch.nn.Linear(2, 2), "attn_rate": torch.nn.Linear(2, 1),
                              "mlp": torch.nn.Linear(2, 2)})])})
    named = [(f"module.{n}", p) for n, p in net.named_parameters()]
    groups = param_groups(named, router_lr_mult=10.0, lr_mult={"y_embedder.*": 0.25, "blocks.*.cross_attn.*": 0.5})
    by_id = {id(p): g["lr_mult"] for g in groups for p in g["params"]}
    assert [by_id[id(p)] for _, p in named] == [0.25, 0.25, 0.5, 0.5, 10.0, 10.0, 1.0, 1.0]
    assert groups[0]["lr_mult"] == 1.0 and sum(len(g["params"]) for g in groups) == len(named)
    opt = build_optimizer(groups, OptimConfig(lr=1e-3), torch.device("cpu"))
    assert sorted(g["lr"] for g in opt.param_groups) == [2.5e-4, 5e-4, 1e-3, 1e-2]
    with pytest.raises(ValueError, match=r"'y_embeder.\*' names no trainable parameter"):
        param_groups(named, 1.0, {"y_embeder.*": 0.5})
    base = ["teacher=null", "student.model=dit-s/2", "student.init=random"]
    with pytest.raises(ConfigError, match=r"optim.lr_mult\['y_embedder.\*'\]=0.0 is invalid: must be > 0"):
        load_config(None, [*base, "optim.lr_mult={y_embedder.*: 0.0}"], world_size=1)
    cfg = load_config(None, [*base, "optim.lr_mult={y_embedder.*: 0.3, blocks.*.cross_attn.*: 0.5}"], world_size=1)
    assert dict(cfg.optim.lr_mult) == {"y_embedder.*": 0.3, "blocks.*.cross_attn.*": 0.5}
