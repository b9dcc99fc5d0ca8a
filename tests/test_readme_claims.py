"""Claims of README.md, model/README.md and slurm/README.md that no other test pins, checked as the
READMEs state them (the figures are read from the README text where it quotes them, so an edit of either
side fails here).

Checked elsewhere: the ``pretrain.plan <args>: N GB`` figures of README.md (tests/test_plan.py), the
modules that ``python -m X`` names (tests/test_conf_commands.py), the slurm/README.md examples passing
the submit-time checks (tests/slurm/test_submit.py), the tolerances of the parity, CP, resume, RL and
distillation tests (each test file's constants, which the READMEs quote).
"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = [ROOT / "README.md", ROOT / "model" / "README.md", ROOT / "slurm" / "README.md"]


def _text(path: Path) -> str:
    """The README with its shell continuation lines joined and its lines joined by spaces (a claim may
    wrap)."""
    return " ".join(path.read_text().replace("\\\n", " ").split())


# ----------------------------------------------------------------------------------------------------
# Names: config keys and command-line flags


_CONFIG_KEY = re.compile(r"(?<![\w./<-])((?:stage|data|train|cluster|parallel|model)\.[a-z_][\w.]*[a-z_])")
# The stages whose configs hold every key a README names: pre-training, RL, distillation.
_KEY_STAGES = ("s1_pretrain", "rl_sapo", "distill")


def _is_code_name(name: str) -> bool:
    """``model.kv_cache.KVCache``, ``pretrain/train.py``: a module path or file name, not a config key."""
    parts = name.split(".")
    return name.endswith((".py", ".yaml", ".json", ".jsonl")) or (ROOT / parts[0] / f"{parts[1]}.py").is_file() \
        or (ROOT / parts[0] / parts[1]).is_dir()


def _has_key(cfg: dict, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return False
        cfg = cfg[part]
    return True


def test_every_config_key_the_readmes_name_exists():
    from omegaconf import OmegaConf

    from pretrain.cli import compose

    configs = [OmegaConf.to_container(compose([f"stage={stage}", "cluster=example_h100"]), resolve=False)
               for stage in _KEY_STAGES]
    named = {(path.relative_to(ROOT), key) for path in READMES for key in _CONFIG_KEY.findall(_text(path))
             if not _is_code_name(key)}
    assert len(named) > 40  # the scan works: the READMEs name many keys
    stale = sorted(f"{where}: {key}" for where, key in named if not any(_has_key(c, key) for c in configs))
    assert not stale, stale


def test_the_parallel_group_has_the_keys_the_readme_lists():
    from pretrain.cli import compose

    listed = re.search(r"from the `parallel` group \(([^)]*)\)", _text(ROOT / "README.md")).group(1)
    assert re.findall(r"`(\w+)`", listed) == list(compose([])["parallel"])


def _data_tools_flags(command: str) -> set[str]:
    from data_tools.__main__ import COMMANDS

    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[command]).add_arguments(parser)
    return {flag for action in parser._actions for flag in action.option_strings}


def test_every_data_tools_command_and_flag_the_readme_shows_exists():
    from data_tools.__main__ import COMMANDS

    shown = re.findall(r"python -m data_tools ([a-z][a-z|-]*[a-z])((?: +(?!python )\S+)*)",
                       (ROOT / "README.md").read_text().replace("\\\n", " "))
    assert len(shown) >= 12
    missing = []
    for commands, rest in shown:
        for command in commands.split("|"):
            if command not in COMMANDS:
                missing.append(command)
                continue
            flags = _data_tools_flags(command)
            missing += [f"{command} {flag}" for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", rest) if flag not in flags]
    assert not missing, missing
    # "(..., `--workers`, `--resume`)": every builder and importer takes both.
    for command in [c for c in COMMANDS if c.startswith(("build-", "import-"))]:
        assert {"--workers", "--resume"} <= _data_tools_flags(command), command


class _Parsed(Exception):
    """Raised with the namespace a command's real parser produced, to stop the command there."""

    def __init__(self, namespace: argparse.Namespace):
        super().__init__()
        self.namespace = namespace


def _parsed_args(monkeypatch, main, argv: list[str]) -> argparse.Namespace:
    """The arguments ``main(argv)`` parses (its own parser and defaults), without running the command."""
    parse = argparse.ArgumentParser.parse_args

    def parse_and_stop(parser, args=None, namespace=None):
        raise _Parsed(parse(parser, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    with pytest.raises(_Parsed) as parsed:
        main(argv)
    monkeypatch.undo()
    return parsed.value.namespace


def test_the_defaults_the_readmes_quote(monkeypatch):
    from model.check_parity import main as check_parity
    from pretrain.cli import compose
    from pretrain.evaluate import main as evaluate
    from tests.model.test_qwen3vl_parity import LOGIT_TOL

    # README: "the evaluation batches `--batch-size` questions (default 32)"
    assert "batches `--batch-size` questions (default 32)" in _text(ROOT / "README.md")
    assert _parsed_args(monkeypatch, evaluate, ["--ckpt", "c", "--eval", "e"]).batch_size == 32
    # model/README: check_parity's `--tolerance` "(default 1e-5, the bound the parity test asserts"
    assert "`--tolerance` (default 1e-5, the bound the parity test asserts" in _text(ROOT / "model" / "README.md")
    assert _parsed_args(monkeypatch, check_parity, ["--hf", "h"]).tolerance == 1e-5 == LOGIT_TOL
    # README: "Sampling at temperature 1, as the stage's default does"; "drops the groups where every
    # response failed or at least 15 of 16 succeeded"
    for stage in ("rl_sapo", "rl_grpo", "rl_gspo"):
        rl = compose([f"stage={stage}"]).stage.rl
        assert rl.temperature == 1.0 and rl.group_size == 16 and rl.filter.easy_fraction == 15 / 16, stage


# ----------------------------------------------------------------------------------------------------
# Stages


def test_the_stages_are_what_the_readme_says():
    """README: "`s0_align` (merger only, 8K, 67B tokens), `s1_pretrain` (all, 8K, ~1T), `s2_long_32k`
    (32K, ~1T), `s3_long_256k` (256K, 100B)"; the 256K stages default to `parallel=cp8` and full
    recomputation (`{granularity: full, method: uniform, num_layers: 1}`)."""
    from pretrain.cli import compose

    text = _text(ROOT / "README.md")
    assert "`s0_align` (merger only, 8K, 67B tokens), `s1_pretrain` (all, 8K, ~1T), `s2_long_32k` (32K, ~1T), " \
           "`s3_long_256k` (256K, 100B)" in text
    want = {"s0_align": (8192, 67e9, ["merger"]), "s1_pretrain": (8192, 1e12, None),
            "s2_long_32k": (32768, 1e12, None), "s3_long_256k": (262144, 100e9, None)}
    for stage, (seq_length, tokens, trainable) in want.items():
        cfg = compose([f"stage={stage}"]).stage
        assert (cfg.seq_length, cfg.train_tokens) == (seq_length, tokens), stage
        assert list(cfg.trainable) == (trainable or ["vision", "merger", "language"]), stage
    assert "`stage.recompute: {granularity: full, method: uniform, num_layers: 1}`" in text
    for stage in ("s3_long_256k", "sft_long_256k"):
        cfg = compose([f"stage={stage}"])
        assert cfg.parallel.cp == 8 and cfg.parallel.tp == 1 and cfg.stage.seq_length == 262144, stage
        assert dict(cfg.stage.recompute) == {"granularity": "full", "method": "uniform", "num_layers": 1}, stage


def test_the_aux_loss_weight_multipliers_are_moe_layers_over_top_k():
    """model/README: the balancing weight is about `moe_layers / top_k` times transformers' "(6x for 30B-A3B,
    11.75x for 235B-A22B)"."""
    from model.registry import get_config

    text = _text(ROOT / "model" / "README.md")
    quoted = dict(re.findall(r"(\d+(?:\.\d+)?)x for (\S+?)[,;]", text))
    assert quoted == {"6": "30B-A3B", "11.75": "235B-A22B"}
    for factor, name in quoted.items():
        t = get_config(f"qwen3vl_{name.lower().replace('-', '_')}").text
        assert sum(t.moe_layer_pattern()) / t.num_experts_per_tok == float(factor), name


# ----------------------------------------------------------------------------------------------------
# data_tools exit statuses


def test_build_exit_statuses(tmp_path, capsys):
    """README: "bad inputs alone exit 0, or 1 when no line was accepted; 2: the build cannot start"."""
    from PIL import Image

    from data_tools.__main__ import main

    assert "(bad inputs alone exit 0, or 1 when no line was accepted; 2: the build cannot start)" in \
        _text(ROOT / "README.md")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "bad.jsonl").write_text('{"image": "gone.png", "text": "a red circle"}\n')
    (tmp_path / "mixed.jsonl").write_text('{"image": "red.png", "text": "a red square"}\n'
                                          '{"image": "gone.png", "text": "a red circle"}\n')

    def build(manifest: str, out: str) -> int:
        return main(["build-image-text", "--manifest", str(tmp_path / manifest), "--out", str(tmp_path / out),
                     "--workers", "0", "--no-progress"])

    assert build("bad.jsonl", "none") == 1
    assert build("mixed.jsonl", "some") == 0
    assert build("mixed.jsonl", "some") == 2  # a finished set without --resume/--overwrite: cannot start
    assert "missing_file 1" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# Context parallelism's load balance (README, Long context)


def test_context_parallel_balance_figures():
    """README: at 256K tokens the busiest rank's attention work over the mean is 1.00 for every mix (cp 2
    and 8), where a cut of the whole pack gives 1.77 (one 192K document, then 1K ones), 1.59 (a half, a
    quarter and 2K ones) and 1.04-1.14 (documents of 256-4096 tokens): `benchmarks/bench_attention.py`'s
    count, by its functions."""
    from benchmarks.bench_attention import _rank_work, balance_mixes
    from model.context_parallel import rank_positions

    text = _text(ROOT / "README.md")
    claim = re.search(r"the busiest rank's work over the mean (\d\.\d\d) for every mix \(cp 2 and 8\), where a "
                      r"cut of the whole pack gives (\d\.\d\d) for a pack of one 192K document then 1K ones and "
                      r"(\d\.\d\d) for a half, a quarter and 2K ones \((\d\.\d\d)-(\d\.\d\d) for documents", text)
    assert claim, "the README's balance sentence changed: update this test"
    balanced, one_long, half_quarter, low, high = claim.groups()

    def ratio(ids, positions) -> str:
        work = _rank_work(ids, positions)
        return f"{max(work) * len(work) / sum(work):.2f}"

    seq = 262144
    mixes = balance_mixes(seq)
    whole = {}
    for name, ids in mixes.items():
        for cp in (2, 8):
            assert ratio(ids, rank_positions(ids, seq, cp)) == balanced, (name, cp)
            whole[name, cp] = ratio(ids, rank_positions(None, seq, cp))
    assert {whole["3/4 one document, then 1K ones", cp] for cp in (2, 8)} == {one_long}
    assert {whole["a half, a quarter, 2K ones", cp] for cp in (2, 8)} == {half_quarter}
    assert sorted(whole["documents of 256-4096 tokens", cp] for cp in (2, 8)) == [low, high]


# ----------------------------------------------------------------------------------------------------
# slurm/README.md: the chain's plans and the refusal without a visual-patch bound


def _plans_printed(out: str) -> dict[str, str]:
    """{stage: total GB} from the plans a ``--dry-run`` prints."""
    return dict(re.findall(r"^# plan: .*?, stage (\w+), .*?^#   total +(\d+\.\d)", out, flags=re.M | re.S))


def _on_example_cluster(args: list[str], cluster: dict, tmp_path: Path) -> list[str]:
    """A README command with ``cluster=mycluster`` run on example_h100 with the README file's sizes."""
    args = [a for a in args if a != "--dry-run"]
    at = args.index("cluster=mycluster")
    args[at:at + 1] = ["cluster=example_h100", f"cluster.nodes={cluster['nodes']}",
                       f"cluster.gpu_memory_gb={cluster['gpu_memory_gb']}",
                       f"cluster.tasks_per_node={cluster['tasks_per_node']}"]
    return [a.replace("/lustre/me", str(tmp_path)) for a in args]


def test_the_chain_plans_slurm_readme_quotes(tmp_path, capsys):
    from tests.slurm.test_submit import _readme_submissions, dry_run

    text = _text(ROOT / "slurm" / "README.md")
    claim = re.search(r"Plans per GPU \(80 GB\): s0_align (\d+\.\d) GB .*?, s1 (\d+\.\d), s2 and sft (\d+\.\d) "
                      r"\(full recomputation\), s3 at 256K over 32 nodes as cp8 x tp2 (\d+\.\d)\.", text)
    assert claim, "the chain's plan sentence of slurm/README.md changed: update this test"
    s0, s1, s2_sft, s3 = claim.groups()
    cluster, commands = _readme_submissions()
    chain = next(c for c in commands if "--chain" in c)
    code, out, err = dry_run(_on_example_cluster(chain, cluster, tmp_path), tmp_path, capsys)
    assert code == 0, err
    assert _plans_printed(out) == {"s0_align": s0, "s1_pretrain": s1, "s2_long_32k": s2_sft, "s3_long_256k": s3,
                                   "sft": s2_sft}
    assert "32 nodes" in text and re.search(r"stage s3_long_256k, 256 GPUs as tp2 pp1 cp8 ", out)


def test_without_a_visual_patch_bound_the_slurm_readme_example_is_refused(tmp_path, capsys):
    """slurm/README: "without a bound the plan assumes sequences of images only, 90.7 GB per GPU, and the
    submission is refused on 80 GB GPUs"."""
    from tests.slurm.test_submit import _readme_submissions, dry_run

    claim = re.search(r"without a bound the plan assumes sequences of images only, (\d+\.\d) GB per GPU, and the "
                      r"submission is refused on 80 GB GPUs", _text(ROOT / "slurm" / "README.md"))
    assert claim
    cluster, commands = _readme_submissions()
    first = [a for a in commands[0] if not a.startswith("data.max_visual_patches_per_pack=")]
    assert len(first) == len(commands[0]) - 1
    code, out, err = dry_run(_on_example_cluster(first, cluster, tmp_path), tmp_path, capsys)
    assert code == 2 and err.startswith(f"config error: stage s1_pretrain: the plan needs {claim.group(1)} GB per GPU")


# ----------------------------------------------------------------------------------------------------
# Resume: a changed stage.optimizer setting is refused, naming it


@pytest.mark.parametrize("setting, value", [("min_lr", 1e-6), ("warmup_steps", 7), ("weight_decay", 0.01)])
def test_a_resume_with_any_changed_schedule_setting_the_readme_lists_is_refused(tmp_path, setting, value):
    """README: a resume "whose `stage.optimizer` settings changed (lr, min_lr, warm-up, schedule, decay fraction,
    weight decay) is refused, naming them"; tests/test_trainer.py covers lr, schedule and decay fraction."""
    import dataclasses

    import torch

    from pretrain.checkpoint import CheckpointError, TrainerState
    from pretrain.cli import load_job
    from pretrain.lr_schedule import build_lr_scheduler
    from pretrain.trainer import check_resumed_schedule, schedule_state

    assert "`stage.optimizer` settings changed (lr, min_lr, warm-up, schedule, decay fraction, weight decay) is " \
           "refused, naming them" in _text(ROOT / "README.md")
    opt = load_job(["stage=s1_pretrain"])[1].stage.optimizer  # WSD

    def scheduler(**changes):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
        return build_lr_scheduler(optimizer, dataclasses.replace(opt, **changes), 100)

    saved = TrainerState(stage="s1_pretrain", step=40, scheduler=schedule_state(scheduler()))
    with pytest.raises(CheckpointError, match=rf"stage\.optimizer\.{setting}\b.*: saved "):
        check_resumed_schedule(tmp_path, saved, scheduler(**{setting: value}), 100)
