"""Every stage key of a small toy MoCAN and PeCAN run, against keys recorded before the modules were re-cut (issue 21).

A run folder resumes a stage when its key matches, so a refactoring that changes a key silently invalidates every saved
run (or, worse, a changed key function could reuse a stage it should redo). The runs below use nothing that depends on
the machine: a toy Llama initialized from a fixed seed (not fitted), the toy tokenizer, prompts and scorers, and
preference pairs written out here. Their keys are therefore the same on every machine with the pinned packages.
"""
import functools, json
import pytest
import torch
from datasets import Dataset
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from safe_dual.mocan import MoCAN
from safe_dual.pecan import PeCAN
from safe_dual.toy import ToyConfig, toy_harm, toy_prompts, toy_responses, toy_reward, toy_tokenizer

TINY = dict(learning_rate=1e-2, max_steps=1, per_device_train_batch_size=8, logging_strategy="no", save_strategy="no",
            disable_tqdm=True, lora_r=2)

# recorded on main at 14bfa6a (before the re-cut), with `python tests/test_stage_keys.py`
RECORDED = {
    "mocan": {"collect": "1282f8724372bf3b", "dual": "6e8c8648c50032f3", "label": "3694b8225f1f5ec8",
              "train": "5bd255dae2b6b117", "evaluate": "be6530f7dcc688a9"},
    "pecan": {"prealign/helpful": "b8278bf5ff2f69c9", "prealign/safety_1": "a7e7ba4e3060ab8f",
              "prealign/safety_2": "dbf96e0b76e11f08", "collect": "148286d5375a57ac", "dual": "f8315f2105c49f36",
              "label": "3a32b2cf175971ba", "train": "bb7c8115ebf23e0c", "evaluate": "9e7d533fb13856a2"},
}


def pieces():
    "A seeded, unfitted toy policy and the toy world's tokenizer, prompts and scorers."
    config = ToyConfig()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(config.words) + 1, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                             max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    model.generation_config = GenerationConfig(do_sample=True, max_new_tokens=config.max_len, bos_token_id=0,
                                               eos_token_id=0, pad_token_id=0)
    prompts, eval_prompts = toy_prompts(config, 0)
    scorers = dict(reward=toy_reward, safety=[functools.partial(toy_harm, hazard=h) for h in config.hazards])
    return config, model.eval(), toy_tokenizer(config.words), prompts[:6], eval_prompts[:3], scorers


def preferences(config, seed):
    "Eight fixed preference pairs over toy prompts and responses."
    prompts, responses = toy_prompts(config, seed)[0][:8], toy_responses(config)[0][1:17]
    return Dataset.from_dict(dict(prompt=prompts, chosen=responses[::2], rejected=responses[1::2]))


def keys(folder):
    "Stage name -> key, for every `stage.json` under the run folder."
    return {str(p.parent.relative_to(folder)): json.loads(p.read_text())["key"] for p in sorted(folder.rglob("stage.json"))}


def mocan_keys(folder):
    config, model, tokenizer, prompts, eval_prompts, scorers = pieces()
    MoCAN(model, tokenizer, prompts, scorers, thresholds=[-0.5, -0.6], beta=1.0, n_samples=3, output_dir=folder,
          eval_prompts=eval_prompts, max_new_tokens=config.max_len, batch_size=16, n_eval=2, bootstrap=0,
          train_args=TINY).run()
    return keys(folder)


def pecan_keys(folder):
    config, model, tokenizer, prompts, eval_prompts, scorers = pieces()
    PeCAN(model, tokenizer, prompts, preferences(config, 1), [preferences(config, 2), preferences(config, 3)],
          margins=[0.0, 0.001], beta=1.0, n_samples=4, output_dir=folder, eval_prompts=eval_prompts,
          max_new_tokens=config.max_len, batch_size=16, n_eval=2, holdout=0.0, prealign_args=TINY, train_args=TINY).run()
    return keys(folder)


@pytest.mark.parametrize("pipeline", ["mocan", "pecan"])
def test_stage_keys_unchanged(pipeline, tmp_path):
    got = dict(mocan=mocan_keys, pecan=pecan_keys)[pipeline](tmp_path)
    assert got == RECORDED[pipeline], f"stage keys changed: {got}"


if __name__ == "__main__":  # prints the keys to record
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d: print(json.dumps(dict(mocan=mocan_keys(Path(d) / "m"), pecan=pecan_keys(Path(d) / "p")), indent=1))
