"""HyTuning in TRL: hykernels.integrations.trl.HyTuningTrainer (a trl.GRPOTrainer) on toy data.

Each step mixes curated traces (RD, teacher-forced) with the policy's own rollouts (RLIF, GRPO
rewarded by self-certainty gated by PRG), weighed by λ; log-probs, rewards, PRG and the loss come
from hidden states and the lm_head weight (docs/guides/trl.md). ``--traces-per-step 0`` is plain
GRPO with hykernels' loss (equal to TRL's own). Offline, on the CPU, in seconds:

    pip install "hykernels[trl]"
    python examples/trl_grpo.py --steps 2 [--loss-type grpo] [--importance-sampling-level sequence]
"""
import argparse

from datasets import Dataset

from hykernels.hytuning import LOSS_TYPES
from hykernels.integrations.trl import HyTuningTrainer, HyTuningTrainerConfig
from recipe_common import char_tokenizer, tiny_causal_lm, train_in_tempdir

PROMPTS = ["2+2=", "7+5=", "Q: sky? A:", "abc"]
TRACES = [dict(prompt="2+3=", reasoning="2+3 is 5.\n\n5 is odd.", answer="5"),
          dict(prompt="4+4=", reasoning="4+4 is 8.", answer="8")]


def make_trainer(args, output_dir) -> HyTuningTrainer:
    tok = char_tokenizer()
    config = HyTuningTrainerConfig(
        output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=8, learning_rate=args.lr, beta=args.beta, loss_type=args.loss_type,
        importance_sampling_level=args.importance_sampling_level, use_bias_correction_kl=args.bias_correction_kl,
        traces_per_step=args.traces_per_step, logging_steps=1, report_to=[], use_cpu=True,
        bf16=False, save_strategy="no", disable_tqdm=True)  # fp32: TRL defaults to bf16
    # Given by path: TRL loads the policy and (beta > 0) the reference model from it.
    tiny_causal_lm("qwen2", len(tok)).save_pretrained(f"{output_dir}/init")
    prompts, traces = Dataset.from_dict({"prompt": PROMPTS}), Dataset.from_list(TRACES)
    return HyTuningTrainer(model=f"{output_dir}/init", args=config, train_dataset=prompts, trace_dataset=traces,
                           processing_class=tok)


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--beta", type=float, default=0.04, help="KL weight to the reference model")
    p.add_argument("--loss-type", default="dapo", choices=LOSS_TYPES, help="TRL's loss normalisation")
    p.add_argument("--importance-sampling-level", default="token", choices=("token", "sequence"),
                   help="sequence: GSPO's one ratio per completion")
    p.add_argument("--bias-correction-kl", action="store_true", help="TRL's use_bias_correction_kl (ratio · k3)")
    p.add_argument("--traces-per-step", type=int, default=2, help="curated traces per step; 0: GRPO only")
    return p.parse_args(argv)


def main(argv=None):
    trainer = train_in_tempdir(make_trainer, parse_args(argv))
    for h in trainer.state.log_history[:-1]:
        print(f"step {h['step']}  loss {h['loss']:+.4f}  λ {h['lambda']:.3f}  reward {h['reward']:.3f}  "
              f"PRG traces {h.get('prg_traces', float('nan')):.3f} rollouts {h['prg_rollouts']:.3f}")
    return trainer


if __name__ == "__main__":
    main()
