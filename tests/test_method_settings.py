"""Each method's own settings (issue 15 item 4): read flat from the `method` section, refused when
they do not apply to the chosen method, dropped from old saved configs that hold every method's
keys, checked with the messages `validate` always gave, and offered as pretrain flags."""

import dataclasses

import pytest
import yaml
from cli_util import run, user_error

from clipkit import checkpoint, methods
from clipkit.cli.pretrain import resolve_config
from clipkit.config import Config, ConfigError, MethodConfig, validate
from clipkit.config_resume import check_resume, with_legacy_defaults
from clipkit.method_config import flag_of
from clipkit.methods.aclip_settings import ACLIPSettings, FLIPSettings
from clipkit.run_dir import RunDir

# The method section every saved config held before methods owned their settings.
OLD_METHOD_SECTION = {
    "name": "clip",
    "mask_ratio": 0.5,
    "keep_ratio": 0.5,
    "num_views": 2,
    "clip_weight": 1.0,
    "simclr_weight": 1.0,
    "byol_weight": 2.0,
    "simclr_temperature": 0.1,
    "ema_momentum": 0.996,
    "ema_momentum_end": 1.0,
    "attentive": True,
    "ssl_hidden_dim": 4096,
    "ssl_embed_dim": 256,
}
# the settings every method shares (issue 16: the contrastive loss, distillation)
COMMON_DEFAULTS = {"loss": "clip", "distill_from": None, "distill_weight": 1.0}
REQUIRED = {"data": {"data": "shards"}, "run": {"out": "runs/x", "steps": 1}}


def test_settings_classes_match_the_method_classes():
    for name in methods.list_methods():
        assert methods.settings_class(name) is methods.method_class(name).settings_class, name
    assert methods.settings_class("clip") is None
    assert methods.settings_class("flip") is FLIPSettings
    for name in ("aclip", "aclip-eff", "attmask-high"):
        assert methods.settings_class(name) is ACLIPSettings


def test_method_section_stays_flat_and_typed():
    cfg = Config.from_dict({"method": {"name": "aclip", "keep_ratio": "0.3", "num_views": 1.0}})
    assert isinstance(cfg.method.settings, ACLIPSettings)
    assert cfg.method.settings.keep_ratio == 0.3 and cfg.method.settings.num_views == 1
    section = cfg.to_dict()["method"]
    assert section["name"] == "aclip" and section["keep_ratio"] == 0.3
    assert "settings" not in section and "mask_ratio" not in section
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert Config().to_dict()["method"] == {"name": "clip", **COMMON_DEFAULTS}


def test_old_saved_config_drops_other_methods_keys():
    cfg = Config.from_dict({"method": OLD_METHOD_SECTION})
    assert cfg.method == MethodConfig(name="clip") and cfg.method.settings is None
    old_flip = Config.from_dict({"method": {**OLD_METHOD_SECTION, "name": "flip"}})
    assert old_flip.method.settings == FLIPSettings(mask_ratio=0.5)
    with pytest.raises(ConfigError, match="unknown option 'method.masks_ratio'"):
        Config.from_dict({"method": {**OLD_METHOD_SECTION, "masks_ratio": 0.5}})


def test_resume_still_refuses_a_changed_method_setting():
    old = {**REQUIRED, "method": {**OLD_METHOD_SECTION, "name": "aclip"}}
    saved = Config.from_dict(with_legacy_defaults(old))  # as `clipkit pretrain --resume` reads it
    check_resume(Config.from_dict(saved.to_dict()), old)  # the old layout: nothing changed
    changed = Config.from_dict(saved.to_dict())
    changed.method.settings.keep_ratio = 0.25
    with pytest.raises(ConfigError, match=r"method.keep_ratio \(saved 0.5, given 0.25\)"):
        check_resume(changed, saved.to_dict())


def test_setting_of_another_method_is_refused_from_yaml(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"method": {"name": "clip", "keep_ratio": 0.3}}))
    cfg = resolve_config(str(f), False, REQUIRED)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value) == (
        f"method.keep_ratio (in config file {f}) does not apply to method clip "
        "(it is a setting of: aclip, aclip-eff, attmask-high)"
    )
    # the method may come from a later layer: the YAML's setting then applies
    cfg = resolve_config(str(f), False, {**REQUIRED, "method": {"name": "aclip-eff"}})
    assert validate(cfg).method.settings.keep_ratio == 0.3


def test_setting_of_another_method_is_refused_as_a_flag(demo_root, tmp_path):
    out = tmp_path / "run"
    base = ["pretrain", "--data", demo_root / "train", "--out", out, "--steps", 1]
    error = user_error(*base, "--keep-ratio", 0.3)
    assert error == (
        "error: --keep-ratio does not apply to --method clip "
        "(it is a setting of: aclip, aclip-eff, attmask-high)"
    )
    assert "--mask-ratio does not apply to --method aclip (it is a setting of: flip)" in (
        user_error(*base, "--method", "aclip", "--mask-ratio", 0.3)
    )
    assert "--attentive does not apply to --method flip" in user_error(
        *base, "--method", "flip", "--random-blocks"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "method, message",
    [
        ({"name": "flip", "mask_ratio": 1.0}, "--mask-ratio must be within [0, 1)"),
        ({"name": "aclip", "keep_ratio": 0}, "--keep-ratio must be within (0, 1]"),
        ({"name": "aclip-eff", "num_views": 3}, "--num-views must be 1 or 2"),
        ({"name": "attmask-high", "ssl_embed_dim": 0}, "SSL head sizes must be >= 1"),
        ({"name": "aclip", "ema_momentum": 0.9, "ema_momentum_end": 0.5}, "EMA momentum: 0 <="),
        ({"name": "aclip", "keep_ratio": float("nan")}, "method.keep_ratio = nan: numbers must"),
        ({"name": "aclip", "num_views": 1.5}, "method.num_views = 1.5 is not an integer"),
        ({"name": "magic"}, "unknown method 'magic' (known: aclip, aclip-eff, "),
    ],
)
def test_validate_keeps_its_messages(method, message):
    with pytest.raises(ConfigError) as e:
        cfg = Config.from_dict(REQUIRED)
        cfg.method.update(method)
        validate(cfg)
    assert message in str(e.value)


def test_method_config_of_and_direct_construction():
    assert MethodConfig.of("flip", mask_ratio="0.75").settings == FLIPSettings(mask_ratio=0.75)
    with pytest.raises(ConfigError, match="--keep-ratio does not apply|keep_ratio does not apply"):
        MethodConfig.of("flip", keep_ratio=0.3)
    wrong = Config.from_dict(REQUIRED)
    wrong.method = MethodConfig(name="aclip", settings=FLIPSettings())
    with pytest.raises(ConfigError, match="method 'aclip' takes ACLIPSettings, not FLIPSettings"):
        validate(wrong)


def test_help_lists_every_method_flag():
    code, stdout, _ = run("pretrain", "--help")
    assert code == 0
    for name in methods._BUILTIN:  # a method a test module registers came after the CLI was built
        cls = methods.settings_class(name)
        for f in dataclasses.fields(cls) if cls is not None else ():
            if f.metadata["cli"]:
                assert flag_of(f).split("/")[0] in stdout, (name, f.name)
    assert "--attentive / --random-blocks" in stdout
    assert "aclip, aclip-eff, attmask-high: share of 2x2 patch blocks kept" in " ".join(
        stdout.split()
    )
    assert "flip: share of patch tokens removed" in " ".join(stdout.split())


def test_old_saved_run_with_every_key_resumes(demo_root, tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--data", demo_root / "train", "--out", out, "--model", "test",
            "--batch-size", 8, "--workers", 0, "--device", "cpu", "--threads", 1]  # fmt: skip
    code, _, stderr = run(*args, "--steps", 1)
    assert code == 0, stderr
    layout = RunDir(out)
    state = checkpoint.load(layout.latest)
    state = {k: v for k, v in state.items() if k not in ("format_version", checkpoint.CHECKSUM_KEY)}
    state["config"]["method"] = dict(OLD_METHOD_SECTION)  # as runs before issue 15 saved it
    checkpoint.save(state, layout.latest)
    saved_yaml = yaml.safe_load(layout.config.read_text())
    layout.config.write_text(yaml.safe_dump({**saved_yaml, "method": OLD_METHOD_SECTION}))
    code, stdout, stderr = run(*args, "--steps", 2, "--resume")
    assert code == 0, stderr
    assert "done: 2 steps" in stdout
    assert checkpoint.load(layout.latest)["config"]["method"] == {"name": "clip", **COMMON_DEFAULTS}
