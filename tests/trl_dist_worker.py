"""HyTuningTrainer on several processes (tests/test_trl_distributed.py): one run, as torchrun starts it.

    torchrun --standalone --nproc_per_node 2 tests/trl_dist_worker.py --way ddp --model DIR --out DIR
    python tests/trl_dist_worker.py --way single --model DIR --out DIR   # the same global batch, one process

A tiny Qwen2 (saved by the test) and a one-token-per-character tokenizer; canned rollouts (TRL's
_generate_single_turn returns fixed completions chosen by prompt, so a global batch is the same
whatever process a prompt lands on). The four prompts' groups answer 2, 1, 0 and 2 times, so two
processes always hold unequal numbers of answered rollouts and of PRG probe forwards to run.

--way ddp: the Trainer's DDP; --way fsdp2: accelerate's FSDP2 plugin (every decoder layer and the
root sharded with fully_shard; accelerate enables FSDP only on accelerators, so fsdp_on_cpu lets
its plugin act on a CPU run too); --way single: one process with twice the per-device batch and traces. SGD at a
constant rate, so equal gradients give equal weights. Each process writes result-rank{R}.json:
per step its λ, the trace prompts it trained on, its probe forwards (all and real ones), the
answered rollouts; and params-rank{R}.pt, every parameter in full.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from recipe_common import char_tokenizer  # noqa: E402

from datasets import Dataset  # noqa: E402

import hykernels.integrations.trl as hk_trl  # noqa: E402
from hykernels.integrations.trl import HyTuningTrainer, HyTuningTrainerConfig  # noqa: E402

TOK = char_tokenizer()
PER_DEVICE, TRACES_PER_DEVICE, GENERATIONS = 4, 2, 2
# prompt -> its two canned completions; answered: 2, 1, 0, 2 (5 in all: two processes never hold equal counts)
CANNED = {"Q: 2+3\n": ["2+3 = 5\n\nyes\nAnswer: 5", "5\nAnswer: 5"],
          "Q: 4+1\n": ["no cue at all", "x\n\ny\nAnswer: 5"],
          "Q: 3+3\n": ["nothing", "still nothing"],
          "Q: 1+6\n": ["1+6 = 7\nAnswer: 7", "Answer: 8 and more"]}
TRACES = [dict(prompt=f"Q: {a}+{b}\n", reasoning=f"{a}+{b} = {a + b}\n\nso {a + b}", answer=str(a + b))
          for a, b in ((1, 2), (5, 4), (2, 2), (3, 1), (6, 2), (4, 4), (7, 1), (2, 5))]
LAYER = "Qwen2DecoderLayer"


def canned(prompt_ids, *args, **kwargs):
    seen, out = {}, []
    for ids in prompt_ids:
        text = TOK.decode(ids)
        k = seen.get(text, 0)
        seen[text] = k + 1
        out.append(TOK.encode(CANNED[text][k % GENERATIONS], add_special_tokens=False) + [TOK.eos_token_id])
    return out, None


def fsdp_on_cpu():
    """accelerate picks FSDP only for accelerators (a CPU run becomes MULTI_CPU, i.e. DDP): make a
    state given an FSDP plugin use it on the CPU too, so its FSDP2 path (fully_shard over gloo)
    runs here as it runs on GPUs."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = patched


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--way", choices=("ddp", "fsdp2", "single"), required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--save-steps", type=int, default=0)
    p.add_argument("--resume", default=None)
    a = p.parse_args()
    scale = 2 if a.way == "single" else 1  # one process holds what two would
    if a.way == "fsdp2":
        fsdp_on_cpu()
    fsdp = dict(fsdp="full_shard auto_wrap", fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": [LAYER],
                                                          "reshard_after_forward": True}) if a.way == "fsdp2" else {}
    args = HyTuningTrainerConfig(
        output_dir=a.out, per_device_train_batch_size=PER_DEVICE * scale, num_generations=GENERATIONS,
        traces_per_step=TRACES_PER_DEVICE * scale, max_completion_length=32, optim="sgd", learning_rate=0.2,
        lr_scheduler_type="constant", beta=0.0, loss_type="dapo", logging_steps=1, report_to=[], use_cpu=True,
        max_steps=a.steps, seed=0, disable_tqdm=True, ddp_timeout=120, kappa=2.0, ema=0.5,
        save_strategy="steps" if a.save_steps else "no", save_steps=a.save_steps or 500, **fsdp)
    trainer = HyTuningTrainer(model=a.model, args=args, train_dataset=Dataset.from_dict({"prompt": list(CANNED)}),
                              trace_dataset=Dataset.from_list(TRACES), processing_class=TOK)
    trainer._generate_single_turn = canned
    record = {"lambda": [], "traces": [], "probe_calls": [], "probe_batches": [], "answered": []}

    probe_support, measure = hk_trl.probe_support, trainer.measure_prg
    calls = []

    def counting_probe_support(*args, **kwargs):
        calls.append(1)
        return probe_support(*args, **kwargs)

    def counting_measure(traces):
        calls.clear()
        scores = measure(traces)
        record["probe_calls"].append(len(calls))
        record["probe_batches"].append(-(-len(traces) // args.per_device_train_batch_size))
        return scores

    hk_trl.probe_support, trainer.measure_prg = counting_probe_support, counting_measure
    generate = trainer._generate_and_score_completions

    def recording_generate(inputs):
        out = generate(inputs)
        record["lambda"].append(float(trainer.hytuning.lam))
        record["answered"].append(int(sum(trainer._last_probes)))
        rows = trainer._rd_chunks["train"][0]
        record["traces"].append(sorted(TOK.decode(p[m.bool()].tolist()) + TOK.decode(c[cm.bool()].tolist())
                                       for p, m, c, cm in zip(rows["prompt_ids"], rows["prompt_mask"],
                                                              rows["completion_ids"], rows["completion_mask"])))
        return out

    trainer._generate_and_score_completions = recording_generate
    rollout_probes = trainer._rollout_probes

    def remembering(out, mode):
        probes = rollout_probes(out, mode)
        trainer._last_probes = [r is not None for r in probes]
        return probes

    trainer._rollout_probes = remembering
    trainer.train(resume_from_checkpoint=a.resume)
    rank = trainer.accelerator.process_index
    params = {}
    for name, param in trainer.model.named_parameters():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        params[name.replace("_fsdp_wrapped_module.", "").replace("module.", "")] = full.detach().cpu().clone()
    record["drawn"] = trainer._sampler.drawn
    record["distributed_type"] = str(trainer.accelerator.distributed_type)
    record["param_types"] = sorted({type(p).__name__ for p in trainer.model.parameters()})
    record["world"] = trainer.accelerator.num_processes
    record["log"] = [h for h in trainer.state.log_history if "lambda" in h]
    torch.save(params, os.path.join(a.out, f"params-rank{rank}.pt"))
    with open(os.path.join(a.out, f"result-rank{rank}.json"), "w") as f:
        json.dump(record, f)
    trainer.accelerator.wait_for_everyone()
    print("ok", flush=True)


if __name__ == "__main__":
    main()
