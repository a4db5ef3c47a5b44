"""A real base that never learned to stop (stories260K, trained with BOS only) learns to stop in fine-tuning.

    SFTLIB_FIXTURES=../shared/fixtures pytest -q tests/test_stopping.py

Needs the shared fixture model/stories260K (skips without it). The base gives its end-of-turn token a
probability near 1e-9 where assistant turns end: pre-flight says so, `lora.train_embeddings: auto`
trains that row, and the fine-tuned model ends its held-out answers there.
"""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import needs_stories
from sftlib.config import RunConfig

pytestmark = needs_stories

NAMES = ["Lily", "Tom", "Ben", "Sue", "Max", "Mia", "Sam", "Anna", "Tim", "Lucy", "Jack", "Amy"]
THINGS = ["dog", "cat", "ball", "tree", "car", "bird", "cake", "boat", "sun", "fish"]


@pytest.fixture(scope="module")
def story_data(tmp_path_factory):
    """60 one-line question/answer conversations in the words of TinyStories."""
    path = tmp_path_factory.mktemp("stories-data") / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What did {n} see?"},
                          {"role": "assistant", "content": f"{n} saw a big {THINGS[(i + j) % len(THINGS)]}."}]}
            for i, n in enumerate(NAMES) for j in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(model_dir, data, tmp_path, template, **more):
    return RunConfig.preset("cpu-demo").with_overrides({
        "model.name": str(model_dir), "model.chat_template": template, "data.source": str(data),
        "data.eval_size": 0.2, "lora.train_embeddings": "auto", "train.epochs": 3, "train.learning_rate": 5e-3,
        "train.batch_size": 2, "train.packing": False, "train.warmup_steps": 2, "train.logging_steps": 5,
        "train.output_dir": str(tmp_path / "out"), "export.output_dir": str(tmp_path / "model"), **more})


def _codes(report) -> dict[str, str]:
    return {f.code: f.severity for f in report.findings}


@pytest.mark.parametrize("template", ["chatml", "alpaca"])
def test_stories260k_learns_to_stop(stories_dir, story_data, tmp_path, template):
    """chatml adds its tokens (tied embeddings: the row adapter feeds the head too); alpaca adds none and ends
    turns with EOS, a row the base never predicts. Both end every held-out answer at the end-of-turn token."""
    from sftlib.steps import add_adapters, evaluate, prepare_data, setup, train

    cfg = _cfg(stories_dir, story_data, tmp_path, template)
    quiet = lambda _: None  # noqa: E731
    s = setup(cfg, log=quiet)
    data = prepare_data(cfg, s, log=quiet)
    assert s.tokens.stop_probability < 1e-3 and s.tokens.weak_stop_ids == s.tokens.stop_token_ids[:1]
    assert _codes(data.preflight).get("end_of_turn_unlikely") == "info"  # found, and its row will be trained
    before = evaluate(s.model, s, data, samples=12, log=quiet)
    model = add_adapters(cfg, s, log=quiet)
    train(cfg, model, s, data, log=quiet)
    after = evaluate(model, s, data, samples=12, log=quiet)
    print(f"{template}: held-out loss {before.loss['loss']:.3f} -> {after.loss['loss']:.3f}, stopped "
          f"{sum(a.stopped for a in before.answers)}/{len(before.answers)} -> "
          f"{sum(a.stopped for a in after.answers)}/{len(after.answers)}")
    assert not any(a.stopped for a in before.answers)
    assert after.loss["loss"] < 0.5 * before.loss["loss"]
    assert len(after.answers) == 12 and all(a.stopped for a in after.answers), after.answers

    # Its GGUF files, f16 and q8_0, checked in llama.cpp on the held-out prompts: the same greedy tokens as the
    # model in memory, and the same stop.
    from sftlib.exports import export

    prompts = [m[:-1] for m in data.eval["messages"]]
    report = export(model, s.tokenizer, cfg, ["gguf:f16", "gguf:q8_0"], template=s.template,
                    conversations=prompts, log=quiet)
    for item in report.items:
        c = item.check
        print(f"{template} {item.format}: greedy {c['greedy_identical']}/{len(prompts)} as transformers, stopped "
              f"{c['stopped']}/{c['stop_expected']} where transformers stopped")
        assert item.ok, (item.format, item.summary, c.get("problems"))
        assert c["stop_expected"] == len(prompts) and c["stopped"] == len(prompts), c
        if item.format == "gguf:f16":
            assert c["greedy_identical"] == len(prompts), c  # 16-bit: token for token


def test_preflight_warns_when_the_unlikely_stop_row_stays_frozen(stories_dir, story_data, tmp_path):
    from sftlib.steps import prepare_data, setup

    cfg = _cfg(stories_dir, story_data, tmp_path, "alpaca", **{"lora.train_embeddings": "never"})
    s = setup(cfg, log=lambda _: None)
    report = prepare_data(cfg, s, log=lambda _: None).preflight
    assert _codes(report).get("end_of_turn_unlikely") == "warning"
    text = next(f.message for f in report.findings if f.code == "end_of_turn_unlikely")
    assert "`</s>`" in text and "lora.train_embeddings: auto" in text


def test_an_eos_token_missing_from_the_vocabulary_is_found_and_trained(stories_dir, story_data, tmp_path):
    """A tokenizer whose eos_token is not in its vocabulary: transformers adds it silently as a new row."""
    from sftlib.steps import prepare_data, setup
    from sftlib.training.lora import add_lora, trainable_parameters

    model_dir = tmp_path / "odd-eos"
    shutil.copytree(stories_dir, model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|endoftext|>"
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    cfg = _cfg(model_dir, story_data, tmp_path, "alpaca", **{"lora.train_embeddings": "never"})
    s = setup(cfg, log=lambda _: None)
    eos = s.tokenizer.eos_token_id
    assert eos >= 512 and s.tokens.eos_added and eos in s.tokens.rows_to_train
    codes = _codes(prepare_data(cfg, s, log=lambda _: None).preflight)
    assert codes.get("end_of_turn_not_in_vocab") == "warning" and codes.get("end_of_turn_unlikely") == "warning"
    # under `auto` that row is trained (as trainable tokens: one row of 64 for each trained row)
    auto = cfg.with_overrides({"lora.train_embeddings": "auto"})
    model = add_lora(s.model, auto, s.backend, s.tokens)
    rows = [n for n in trainable_parameters(model) if "trainable_tokens" in n]
    assert rows and model.get_input_embeddings().token_adapter.token_indices["default"] == s.tokens.rows_to_train
