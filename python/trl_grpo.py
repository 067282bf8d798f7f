"""GRPO with TRL's GRPOTrainer, the log-probs, policy loss and rewards computed by hykernels.

HyTuningGRPOTrainer overrides private hooks of trl.GRPOTrainer (written against trl 1.16: check
them when upgrading): _get_per_token_logps_and_entropies (old/reference log-probs: hk.token_stats),
_compute_loss (one hk.fused_loss: PPO-clip on the group advantages with token- or sequence-level
(GSPO) ratios, k3 KL to the reference when beta > 0, ratio-weighted with use_bias_correction_kl,
TRL's loss_type normalisation as per-token weights) and _generate (keeps the prompt ids). Unless
given reward_funcs, rollouts are rewarded by the policy's self-certainty (docs/math.md §4).
Offline, on the CPU, in seconds:

    pip install "hykernels[trl]"
    python python/trl_grpo.py --steps 2 [--loss-type grpo] [--importance-sampling-level sequence]
"""
import argparse

import torch
from datasets import Dataset
from torch.nn.utils.rnn import pad_sequence
from trl import GRPOConfig, GRPOTrainer

import hykernels as hk
from hykernels.hytuning import LOSS_TYPES, grpo_token_weights, rollout_rewards
from hykernels.integrations.transformers import last_hidden_states, lm_head
from recipe_common import char_tokenizer, tiny_causal_lm, train_in_tempdir

class HyTuningGRPOTrainer(GRPOTrainer):
    def __init__(self, *args, reward_funcs=None, **kwargs):
        super().__init__(*args, reward_funcs=reward_funcs or [self.self_certainty], **kwargs)
        self.check_supported()

    def check_supported(self):
        """Refuse the GRPOTrainer settings this recipe does not reproduce (by name)."""
        unsupported = {f"loss_type={self.loss_type!r}": self.loss_type not in LOSS_TYPES,
                       "use_vllm": self.use_vllm, "top_entropy_quantile < 1": self.top_entropy_quantile < 1,
                       "delta": self.args.delta is not None,
                       "entropy_coef (entropy bonus)": self._entropy_bonus_enabled,
                       "off_policy_mask_threshold": self.off_policy_mask_threshold is not None,
                       "router aux loss": self.aux_loss_enabled}
        bad = [name for name, on in unsupported.items() if on]
        if bad:
            raise NotImplementedError(f"this recipe does not reproduce {', '.join(bad)}; it covers loss_type in "
                                      f"{LOSS_TYPES}, importance_sampling_level 'token'/'sequence' and "
                                      "use_bias_correction_kl, without vLLM, entropy mask/bonus, delta, off-policy "
                                      "mask or aux loss")

    def _rows(self, model, input_ids, attention_mask, n):
        """Hidden states predicting the last n tokens, their targets (-100 on padding), lm_head kwargs."""
        with self.accelerator.autocast():  # as TRL runs the model (bf16 where configured)
            hidden = last_hidden_states(model, input_ids, attention_mask=attention_mask)[:, -n - 1:-1]
        targets = input_ids[:, -n:].masked_fill(attention_mask[:, -n:] == 0, -100)
        head = lm_head(model)  # TRL samples and scores at its temperature
        return hidden, targets, head.weight, dict(head.kwargs(), temperature=head.temperature * self.temperature)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, compute_aux_loss=False, **_):
        hidden, targets, weight, kwargs = self._rows(model, input_ids, attention_mask, logits_to_keep)
        stats = hk.token_stats(hidden, weight, targets, **kwargs)
        return stats.logp, (stats.entropy if compute_entropy else None), None

    def _compute_loss(self, model, inputs):
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        hidden, targets, weight, kwargs = self._rows(
            model, torch.cat([inputs["prompt_ids"], completion_ids], 1),
            torch.cat([inputs["prompt_mask"], completion_mask], 1), completion_ids.shape[1])
        mask = completion_mask * inputs.get("tool_mask", 1)  # tool output is attended to, not trained on
        targets = targets.masked_fill(mask == 0, -100)
        w = self._token_weights(mask, inputs, model.training)
        old = inputs.get("old_per_token_logps")  # None: on-policy, ρ ≡ 1 with gradient
        kl = dict(kl_weight=self.beta * w, ref_logp=inputs["ref_per_token_logps"]) if self.beta else {}
        loss, stats = hk.fused_loss(hidden, weight, targets, rlif_weight=w,
                                    advantages=inputs["advantages"],  # [B] (one per completion) or [B, C]
                                    old_logp=old, clip_eps=(self.epsilon_low, self.epsilon_high),
                                    importance_sampling_level=self.importance_sampling_level,
                                    use_bias_correction_kl=self.args.use_bias_correction_kl, **kl, **kwargs)
        metrics, on = self._metrics["train" if model.training else "eval"], mask.bool()
        metrics["entropy"].append(stats.entropy[on].mean().item())
        if self.beta:  # the KL term per token, as TRL logs it
            d = inputs["ref_per_token_logps"] - stats.logp
            kl_tok = d.exp() - d - 1
            if self.args.use_bias_correction_kl:
                kl_tok = kl_tok * self._ratio(stats.logp, old, mask)
            metrics["kl"].append(kl_tok[on].mean().item())
        return loss

    def _ratio(self, logp, old, mask):
        """The importance ratio TRL uses (detached, for logging): per token or per sequence."""
        if old is None:
            return torch.ones_like(logp)
        log_ratio = logp - old
        if self.importance_sampling_level == "sequence":
            log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        return log_ratio.exp().expand_as(logp)

    def _token_weights(self, mask, inputs, training):
        """TRL's loss_type normalisation as per-token weights on the completion mask [B, C]."""
        accumulation = self.current_gradient_accumulation_steps if training else 1
        if self.loss_type == "dapo":  # TRL's default: num_items_in_batch counts the generation batch
            tokens = inputs["num_items_in_batch"].clamp(min=1) / self.accelerator.num_processes
            if training:  # the generation batch is split over steps_per_generation micro-batches
                tokens = tokens * accumulation / self.args.steps_per_generation
            return grpo_token_weights(mask, "dapo", num_items_in_batch=tokens)
        return grpo_token_weights(mask, self.loss_type, max_completion_length=self.max_completion_length) / accumulation

    def _generate(self, prompts):
        out = super()._generate(prompts)
        self._prompt_ids = out[0]  # one per completion, for self_certainty
        return out

    def self_certainty(self, prompts, completion_ids, **_):
        """u_i = the policy's mean self-certainty over rollout i's completion tokens (no grad)."""
        def padded(seqs, side):
            return pad_sequence([torch.tensor(s) for s in seqs], batch_first=True, padding_side=side, padding_value=-1)
        prompt, completion = padded(self._prompt_ids, "left"), padded(completion_ids, "right")
        ids = torch.cat([prompt, completion], 1).to(self.accelerator.device)
        with torch.no_grad():
            hidden, targets, weight, kwargs = self._rows(self.model, ids.clamp(min=0), (ids >= 0).long(),
                                                         completion.shape[1])
        rows = torch.arange(len(prompts), device=ids.device)[:, None]
        seq_ids = torch.where(targets != -100, rows, -1)
        return rollout_rewards(hidden, weight, targets, seq_ids, len(prompts), **kwargs).tolist()


def make_trainer(args, output_dir) -> HyTuningGRPOTrainer:
    tok = char_tokenizer()
    prompts = Dataset.from_dict({"prompt": ["2+2=", "7+5=", "Q: sky? A:", "abc"]})
    config = GRPOConfig(output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=4,
                        num_generations=4, max_completion_length=8, learning_rate=args.lr, beta=args.beta,
                        loss_type=args.loss_type, importance_sampling_level=args.importance_sampling_level,
                        use_bias_correction_kl=args.bias_correction_kl, logging_steps=1, report_to=[], use_cpu=True,
                        bf16=False, save_strategy="no", disable_tqdm=True)  # fp32: TRL defaults to bf16
    # Given by path: TRL loads the policy and (beta > 0) the reference model from it.
    tiny_causal_lm("qwen2", len(tok)).save_pretrained(f"{output_dir}/init")
    return HyTuningGRPOTrainer(model=f"{output_dir}/init", args=config, train_dataset=prompts, processing_class=tok)


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--beta", type=float, default=0.04, help="KL weight to the reference model")
    p.add_argument("--loss-type", default="dapo", choices=LOSS_TYPES, help="TRL's loss normalisation")
    p.add_argument("--importance-sampling-level", default="token", choices=("token", "sequence"),
                   help="sequence: GSPO's one ratio per completion")
    p.add_argument("--bias-correction-kl", action="store_true", help="TRL's use_bias_correction_kl (ratio · k3)")
    return p.parse_args(argv)


def main(argv=None):
    trainer = train_in_tempdir(make_trainer, parse_args(argv))
    for h in trainer.state.log_history[:-1]:
        print(f"step {h['step']}  loss {h['loss']:+.4f}  reward {h['reward']:.3f}  kl {h.get('kl', 0):.2e}")
    return trainer


if __name__ == "__main__":
    main()
