"""Seconds per optimizer step and peak memory: `PseudoPreferenceTrainer` versus TRL's `DPOTrainer`, interleaved.

Both train the same LoRA adapter on the same tiny Llama, text pairs, batch size and learning rate, with reference
log-probs precomputed into the dataset or recomputed every step (adapter disabled). Every measurement runs in a
fresh process on one thread, so its peak resident memory above the imports (VmHWM after a reset, minus VmRSS) is
its own; the configurations take turns round after round. Wall-clock seconds per step are reported with CPU seconds per step, which other load on shared
cores disturbs less. Prints medians and ratios ours / TRL (< 1: we are faster or smaller).

    python bench/train_speed.py [--rounds 3] [--steps 12] [--words 1000]
"""
import argparse, json, subprocess, sys, time
from pathlib import Path

import numpy as np

CONFIGS = [("ours", True), ("trl", True), ("ours", False), ("trl", False)]


def tiny_setup(n_pairs=64, words=1000, seed=0):
    "A 4-layer Llama over a word-level vocabulary and text pairs of 12-20 prompt words and 8-24 response words."
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    vocab = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(words)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         pad_token_id=0, eos_token_id=1, bos_token_id=None))
    rng = np.random.default_rng(seed)
    text = lambda lo, hi: " ".join(f"w{i}" for i in rng.integers(0, words, rng.integers(lo, hi + 1)))
    rows = [(text(12, 20), " " + text(8, 24), " " + text(8, 24)) for _ in range(n_pairs)]
    return model, tokenizer, Dataset.from_dict({k: [r[i] for r in rows] for i, k in enumerate(("prompt", "chosen", "rejected"))})


def rss_mb(field):
    "`VmRSS` (now) or `VmHWM` (peak since the last reset) of this process, in MB (Linux)."
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) / 1024


def measure(impl, precompute, steps, warmup, batch_size, words, output_dir):
    "Train `warmup + steps` optimizer steps in this process; seconds per timed step, init seconds, peak RSS."
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from safe_dual.train import PseudoPreferenceConfig, PseudoPreferenceTrainer

    class Clock(TrainerCallback):
        def __init__(self): self.times = []
        def on_step_end(self, args, state, control, **kwargs): self.times.append((time.perf_counter(), time.process_time()))

    torch.set_num_threads(1)  # the cores are shared with other work: one thread each keeps the comparison fair
    model, tokenizer, pairs = tiny_setup(words=words)
    common = dict(output_dir=output_dir, per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
                  learning_rate=1e-3, max_steps=warmup + steps, logging_steps=10_000, save_strategy="no", disable_tqdm=True,
                  dataloader_pin_memory=False, report_to="none", seed=0)
    clock = Clock()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS: count only what the trainer adds
    before, start = rss_mb("VmRSS"), time.perf_counter()
    if impl == "ours":
        trainer = PseudoPreferenceTrainer(model, tokenizer, pairs, PseudoPreferenceConfig(
            beta=0.1, loss_type="hard", lora_r=8, lora_alpha=16, precompute_ref=precompute, **common), callbacks=[clock])
    else:
        trainer = DPOTrainer(model=model, train_dataset=pairs, processing_class=tokenizer, callbacks=[clock],
                             peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
                             args=DPOConfig(beta=0.1, bf16=False, precompute_ref_log_probs=precompute, **common))
    init_s = time.perf_counter() - start
    trainer.train()
    times = np.array(clock.times)
    wall, cpu = np.diff(times[warmup - 1:], axis=0).mean(0)
    return dict(step_s=float(wall), step_cpu_s=float(cpu), init_s=init_s, peak_mb=rss_mb("VmHWM") - before)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--words", type=int, default=1000, help="vocabulary size (the logits' memory grows with it)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, precompute, output_dir = json.loads(args.child)
        print(json.dumps(measure(impl, precompute, args.steps, args.warmup, args.batch_size, args.words, output_dir)))
        return
    import tempfile
    results = {c: [] for c in CONFIGS}
    for r in range(args.rounds):
        for impl, precompute in CONFIGS:
            child = json.dumps([impl, precompute, tempfile.mkdtemp()])
            out = subprocess.run([sys.executable, __file__, "--child", child, "--steps", str(args.steps), "--warmup",
                                  str(args.warmup), "--batch-size", str(args.batch_size), "--words", str(args.words)],
                                 capture_output=True, text=True)
            if out.returncode: sys.exit(f"{impl} precompute={precompute} failed:\n{out.stderr[-3000:]}")
            results[(impl, precompute)].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: {impl:4s} precompute={precompute!s:5s} {results[(impl, precompute)][-1]}", flush=True)
    med = {c: {k: float(np.median([m[k] for m in ms])) for k in ms[0]} for c, ms in results.items()}
    print(f"\nmedians over {args.rounds} rounds{'':6s}{'s/step':>9s}{'cpu s/step':>11s}{'init s':>9s}{'+peak MB':>9s}")
    for (impl, precompute), m in med.items():
        print(f"{impl + ' precompute=' + str(precompute):31s}{m['step_s']:9.4f}{m['step_cpu_s']:11.4f}{m['init_s']:9.2f}{m['peak_mb']:9.1f}")
    for precompute in (True, False):
        ours, trl = med[("ours", precompute)], med[("trl", precompute)]
        print(f"ratio ours/TRL, precompute={precompute!s:5s}: s/step {ours['step_s'] / trl['step_s']:.3f}, cpu s/step "
              f"{ours['step_cpu_s'] / trl['step_cpu_s']:.3f}, peak memory {ours['peak_mb'] / trl['peak_mb']:.3f}")
    print(f"ours, precomputed / recomputed reference: cpu s/step {med[('ours', True)]['step_cpu_s'] / med[('ours', False)]['step_cpu_s']:.3f}")


if __name__ == "__main__":
    main()
