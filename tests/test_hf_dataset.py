"""The hf_dataset task (datasets.load_dataset, offline) and the library-backed ROUGE of example E2."""

import json
import sys
import warnings
from pathlib import Path

import pytest

from rl_distill.models import char_tokenizer, tiny_llama
from rl_distill.tasks import load_task
from rl_distill.tasks.hf_dataset import RENDERED, check_rendered_prompts, rows_to_examples

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def templated_tokenizer(tmp_path):
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    tiny_llama(len(tok)).save_pretrained(tmp_path / "tok")  # a model folder: what load_tokenizer reads
    tok.save_pretrained(tmp_path / "tok")
    return str(tmp_path / "tok")


def load(path, num_train=3, **options):
    return load_task(
        "hf_dataset",
        num_train=num_train,
        num_eval=1,
        path=str(path),
        cache_dir=str(path.parent / "hf"),
        **options,
    )


def test_columns_with_mapping_from_jsonl_parquet_and_csv(tmp_path):
    rows = [{"question": f"q{i}", "answer_text": f"a{i}", "topic": "t", "id": i} for i in range(4)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    import pandas as pd

    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    for path in (jsonl, tmp_path / "d.parquet", tmp_path / "d.csv"):
        data = load(path, prompt_column="question", reference_column="answer_text", metadata_columns=["id"])
        examples = sorted(data.train + data.eval, key=lambda ex: ex.prompt)
        assert [ex.prompt for ex in examples] == ["q0", "q1", "q2", "q3"]
        assert examples[2].reference == "a2"
        assert examples[2].metadata == {"id": 2}
    # Default metadata: every column not used as prompt or reference.
    data = load(jsonl, prompt_column="question", reference_column="answer_text")
    assert set(data.train[0].metadata) == {"topic", "id"}


def test_save_to_disk_folders_load(tmp_path):
    import datasets

    rows = {"prompt": [f"p{i}" for i in range(4)], "reference": [f"r{i}" for i in range(4)]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "dict"))
    for folder, split in (("saved", "train"), ("dict", "test")):
        data = load(tmp_path / folder, split=split)
        assert sorted((ex.prompt, ex.reference) for ex in data.train + data.eval) == [
            (f"p{i}", f"r{i}") for i in range(4)
        ]
    with pytest.raises(ValueError, match=r"has splits \['test'\], not 'train'"):
        load(tmp_path / "dict")


def test_missing_column_lists_the_found_ones(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "id": 1}] * 4)
    with pytest.raises(ValueError, match=r"no column\(s\) \['prompt'\].*its columns: question, id"):
        load(path)
    with pytest.raises(ValueError, match=r"no column\(s\) \['extra'\]"):
        load(path, prompt_column="question", metadata_columns=["extra"])


def test_empty_prompts_are_listed_by_row(tmp_path):
    rows = [{"prompt": "a"}, {"prompt": ""}, {"prompt": "  "}, {"prompt": None}, {"prompt": "b"}]
    with pytest.raises(
        ValueError, match=r"(?s)3 bad row\(s\).*row 1: empty prompt.*row 2: empty prompt.*row 3"
    ):
        load(write_jsonl(tmp_path / "d.jsonl", rows))


def test_messages_single_user_turn_stays_plain_text(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"yo {i}"}]}
        for i in range(4)
    ]
    data = load(write_jsonl(tmp_path / "m.jsonl", rows))
    ex = sorted(data.train + data.eval, key=lambda e: e.prompt)[1]
    assert (ex.prompt, ex.reference) == ("hi 1", "yo 1")
    assert RENDERED not in ex.metadata and "messages" not in ex.metadata


def test_multi_turn_messages_render_every_turn_but_the_last_through_the_template(
    tmp_path, templated_tokenizer
):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": "first"},
                {"role": "user", "content": "again"},
                {"role": "assistant", "content": f"final {i}"},
            ]
        }
        for i in range(4)
    ] + [{"messages": [{"role": "user", "content": "single"}, {"role": "assistant", "content": "turn"}]}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(ValueError, match=r"(?s)needs a chat template.*data.options.chat_template"):
        load(path)
    data = load(path, num_train=4, chat_template=templated_tokenizer)
    ex = next(e for e in data.train + data.eval if "q2" in e.prompt)
    assert ex.prompt == "<system>be brief\n<user>q2\n<assistant>first\n<user>again\n<assistant>"
    assert ex.reference == "final 2" and ex.metadata[RENDERED] is True
    # With a template every prompt of the data set is rendered alike, a single user turn too.
    single = next(e for e in data.train + data.eval if "single" in e.prompt)
    assert single.prompt == "<user>single\n<assistant>" and single.metadata[RENDERED] is True
    with pytest.raises(ValueError, match="model.chat_template: false"):
        check_rendered_prompts(data, use_chat_template=True)
    check_rendered_prompts(data, use_chat_template=False)


def test_messages_without_a_final_assistant_turn_are_errors(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {
            "messages": [
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"},
                {"role": "user", "content": "e"},
            ]
        },
        {"messages": [{"role": "user"}]},
    ]
    with pytest.raises(ValueError) as err:
        load(write_jsonl(tmp_path / "m.jsonl", rows))
    msg = str(err.value)
    assert "3 bad row(s)" in msg
    assert "row 1: 'messages' has no assistant turn" in msg
    assert "row 2: 'messages' has a last turn that is not the assistant's" in msg
    assert "row 3: 'messages' has a turn without a string 'role' and 'content'" in msg


def test_prompt_completion_pairs_strings_and_turns(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(2)] + [
        {
            "prompt": [{"role": "user", "content": f"p{i}"}],
            "completion": [{"role": "assistant", "content": f"c{i}"}],
        }
        for i in range(2, 4)
    ]
    data = load(write_jsonl(tmp_path / "pc.jsonl", rows))
    got = sorted((ex.prompt, ex.reference) for ex in data.train + data.eval)
    assert got == [(f"p{i}", f"c{i}") for i in range(4)]


def test_prompts_over_max_prompt_tokens_are_skipped_and_counted_or_fail(tmp_path, templated_tokenizer):
    rows = [{"prompt": "x" * n} for n in (2, 3, 4, 5, 40, 50)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    # "<user>" + prompt + "\n<assistant>": 18 template characters around the prompt.
    with pytest.warns(UserWarning, match=r"skipped 2 of 6 prompt\(s\).*max_prompt_tokens=30"):
        data = load(path, tokenizer=templated_tokenizer, max_prompt_tokens=30)
    assert max(len(ex.prompt) for ex in data.train + data.eval) == 5
    with pytest.raises(
        ValueError, match=r"2 prompt\(s\).*exceed max_prompt_tokens=30: row 4 \(58 tokens\), row 5"
    ):
        load(path, tokenizer=templated_tokenizer, max_prompt_tokens=30, too_long="fail")
    with pytest.raises(ValueError, match="needs options.tokenizer"):
        load(path, max_prompt_tokens=30)


def test_no_download_at_run_time(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded at run time"):
        load_task("hf_dataset", path="someone/not-a-cached-dataset", cache_dir=str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_task("hf_dataset", path=str(tmp_path / "missing.jsonl"))


def test_rows_to_examples_rejects_an_empty_source():
    with pytest.raises(ValueError, match="has no rows"):
        rows_to_examples([], source="x")


def test_config_accepts_the_task_options(tmp_path):
    from rl_distill.config import ConfigError, config_from_dict

    cfg = config_from_dict(
        {"data": {"task": "hf_dataset", "options": {"path": "x.jsonl", "format": "messages"}}}
    )
    assert cfg.data.options["format"] == "messages"
    with pytest.raises(ConfigError, match="options.prompt_col: unknown option"):
        config_from_dict({"data": {"task": "hf_dataset", "options": {"prompt_col": "q"}}})


# --- E2's ROUGE comes from the rouge-score package -------------------------------------------------
def test_e2_rouge_is_the_rouge_score_package():
    from rouge_score import rouge_scorer

    sys.path.insert(0, str(ROOT / "examples"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import e2_factuality as e2
    # By hand: bigrams of the candidate {the cat, cat sat, sat on, on the, the mat} against the
    # reference's {the cat, cat sat, sat on, on a, a mat}: 3 shared of 5 and 5, F1 = 0.6.
    assert e2.rouge_n("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(0.6)
    assert e2.rouge_n("Anna Berg wrote 12 books.", "anna berg wrote 12 books") == 1.0
    assert e2.rouge_n("", "a b") == 0.0
    cand, ref = (
        "The Berlin office opened in 1999, with 12 staff.",
        "Berlin's office opened in 1999 with twelve staff",
    )
    lib = rouge_scorer.RougeScorer(["rouge1", "rouge2"]).score(ref, cand)
    assert e2.rouge_n(cand, ref) == lib["rouge2"].fmeasure
    assert e2.rouge_n(cand, ref, n=1) == lib["rouge1"].fmeasure


# --- from YAML, one trainer step ----------------------------------------------------------------
def test_messages_config_trains_a_step_on_a_tiny_model(tmp_path):
    from run_helpers import save_tiny_model

    from rl_distill.config import config_from_dict, load_config, read_config_file
    from rl_distill.trainer import Trainer

    teacher = save_tiny_model(tmp_path / "teacher", num_layers=2)
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    tok.save_pretrained(teacher)
    raw = read_config_file(ROOT / "examples" / "configs" / "hf_dataset_messages.yaml")
    assert load_config(ROOT / "examples" / "configs" / "hf_dataset_messages.yaml").data.task == "hf_dataset"
    raw["model"].update({"teacher": str(teacher), "student_layers": 1, "device": "cpu"})
    raw["data"]["options"].update(
        {
            "path": str(ROOT / raw["data"]["options"]["path"]),
            "chat_template": str(teacher),
            "cache_dir": str(tmp_path / "hf"),
        }
    )
    raw["agent"]["max_new_tokens"] = 6
    raw["train"].update({"steps": 1, "batch_size": 2, "output_dir": str(tmp_path / "run")})
    raw["eval"] = {"num_samples": 1}
    config = config_from_dict(raw)
    trainer = Trainer(config)
    assert all(ex.metadata.get(RENDERED) for ex in trainer.task.train + trainer.task.eval)
    assert any(ex.prompt.startswith("<system>Answer briefly.") for ex in trainer.task.train)
    assert trainer.train().steps == 1
    # The same prompts with the engine's template on would be wrapped twice: refused before any work.
    raw["model"]["chat_template"] = None
    with pytest.raises(ValueError, match="model.chat_template: false"):
        Trainer(config_from_dict(raw))
