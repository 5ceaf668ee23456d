"""Sampling tokens/s, scoring items/s and LoRA training seconds per step for SmolLM2-135M-Instruct on this machine's CPU.

What the SmolLM2 run (nbs/31_smollm2_run.ipynb) is sized by: `sample_responses` with the chat template at the run's batch
size and response length, a sequence-classification head on the SmolLM2 backbone (as `score_models.train_score_model`
saves it) through `HFScoreModel`, and `PseudoPreferenceTrainer` LoRA steps on pairs of sampled responses.

    python bench/smollm2_speed.py [--threads 1] [--batch-size 32] [--max-new-tokens 96] [--train-batch 8]

On a 2-core machine shared with other jobs, one thread is ~4x faster than two (26 vs 6.3 sampled tokens/s at
load average 6): a second thread mostly waits for its partner to be scheduled.
"""
import argparse, json, tempfile, time

import numpy as np


def main(batch_size=32, max_new_tokens=96, train_batch=8, steps=3, threads=1):
    import torch
    torch.set_num_threads(threads)
    from datasets import Dataset
    from transformers import LlamaForSequenceClassification
    from safe_dual.scoring import HFScoreModel
    from safe_dual.assets import load_smollm2
    from safe_dual.console import quiet_third_party
    from safe_dual.sampling import sample_responses
    from safe_dual.train import PseudoPreferenceConfig, PseudoPreferenceTrainer
    from safe_dual.score_models import harmful_prompts, benign_prompts
    with quiet_third_party():
        model, tokenizer = load_smollm2()
        prompts = harmful_prompts()[:batch_size // 2] + benign_prompts()[:batch_size // 2]
        start = time.perf_counter()
        data = sample_responses(model, tokenizer, prompts, 1, max_new_tokens, batch_size=batch_size, chat_template=True,
                                progress=False)
        sample_s = time.perf_counter() - start
        tokens = int(np.sum(data["response_len"]))
        head = LlamaForSequenceClassification(model.config.__class__(**{**model.config.to_dict(), "num_labels": 1}))
        head.model.load_state_dict(model.model.state_dict())
        scorer = HFScoreModel(head, tokenizer, progress=False)
        start = time.perf_counter()
        scorer(data["prompt"], data["response"])
        score_s = time.perf_counter() - start
        pairs = Dataset.from_dict(dict(prompt=data["prompt"][:train_batch], chosen=data["response"][:train_batch],
                                       rejected=data["response"][::-1][:train_batch]))
        with tempfile.TemporaryDirectory() as out:
            args = PseudoPreferenceConfig(output_dir=out, per_device_train_batch_size=train_batch, max_steps=steps,
                                          learning_rate=1e-4, save_strategy="no", report_to="none", disable_tqdm=True,
                                          chat_template=True, logging_steps=1000)
            trainer = PseudoPreferenceTrainer(model, tokenizer, pairs, args)
            start = time.perf_counter()
            trainer.train()
            train_s = (time.perf_counter() - start) / steps
    return dict(threads=torch.get_num_threads(), batch_size=batch_size, max_new_tokens=max_new_tokens,
                sampled_tokens=tokens, mean_response_tokens=tokens / len(data), sampling_tokens_per_s=tokens / sample_s,
                scoring_items_per_s=len(data) / score_s, train_batch=train_batch, train_s_per_step=train_s)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--train-batch", type=int, default=8)
    a = p.parse_args()
    print(json.dumps(main(a.batch_size, a.max_new_tokens, a.train_batch, threads=a.threads), indent=1))
