#!/usr/bin/env bash
# The FSDP2 launches of a 2-GPU machine in one go (docs/device.md, "Several GPUs"), each run whatever the others did:
#   train       torchrun --standalone --nproc-per-node 2 -m quickloris train --fsdp --model DIR ... (embedded addition
#               task, 64 held-out problems scored before/after on the sharded model)
#   accelerate  accelerate launch --config_file examples/fsdp_accelerate.yaml examples/fsdp_two_gpus.py --model DIR
#               --trainer sft ... (TRL SFTTrainer, reverse task)
#   accelerate-train  accelerate launch --config_file examples/fsdp_accelerate.yaml -m quickloris train --fsdp ...
#               (the main command under accelerate's launcher; not in the default list: FSDP_LAUNCHES to add it)
#   pytest      python -m pytest -m "gpu or multigpu" tests/parallel/test_fsdp_example.py
# DIR is made here first, nothing downloaded: a random-init Llama (hidden 1024, 8 layers, 16 query / 4 KV heads, MLP
# 2816: 56 NF4 weights, each split over 2 ranks) in bf16 safetensors + a ChatML byte-level BPE trained on the
# embedded tasks' text.
# `train` runs eager (--no-compile): its inductor compile costs ~2-3 min on the device, which would push the three
# launches past ~8 min; the multigpu test compiles (inductor) under FSDP2. FSDP_TRAIN_ARGS=--compile restores the
# GPU default (then raise FSDP_BUDGET_S to ~540).
#
# Usage: bash scripts/device/run.sh sh:scripts/device/fsdp_launchers.sh          (or: OUT=DIR bash THIS_FILE)
# Writes 4 files to $OUT: fsdp_launchers.json (per launch: command, exit status, time limit, wall time, GPU memory
# used per GPU sampled by nvidia-smi every 0.5 s, and what the command wrote: per-step losses, summaries, test
# outcomes; rewritten after every launch) and one log per launch: fsdp_train.log, fsdp_accelerate.log,
# fsdp_pytest.log. Exit status 0 if every launch passed, else 1. Each launch gets a time limit (timeout) inside a
# total budget, so a hang costs its own launch only; the whole script ends within FSDP_BUDGET_S + ~30 s.
# Knobs: FSDP_LAUNCHES ("train accelerate pytest"), FSDP_BUDGET_S (440), FSDP_NPROC (2), FSDP_STEPS (40),
#   FSDP_SHAPE ("hidden,layers,intermediate,heads,kv_heads": 1024,8,2816,16,4), FSDP_NUM_EVAL (64),
#   FSDP_TRAIN_ARGS / FSDP_ACCELERATE_ARGS (appended options), FSDP_DEVICE=cpu (a rehearsal on gloo CPU ranks),
#   PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
OUT=${OUT:-/tmp/quickloris-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
case ":${PYTHONPATH:-}:" in *":$PWD/src:"*) ;; *) export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" ;; esac
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fsdp-launchers.XXXXXX")
MODEL="$WORK/model"
SUMMARY="$OUT/fsdp_launchers.json"
BUDGET_S=${FSDP_BUDGET_S:-440}
NPROC=${FSDP_NPROC:-2}
STEPS=${FSDP_STEPS:-40}
read -r -a LAUNCHES <<<"${FSDP_LAUNCHES:-train accelerate pytest}"
read -r -a TRAIN_EXTRA <<<"${FSDP_TRAIN_ARGS:-}"
read -r -a ACCEL_EXTRA <<<"${FSDP_ACCELERATE_ARGS:-}"
DEVICE_ARGS=()
if [ "${FSDP_DEVICE:-}" = cpu ]; then
  DEVICE_ARGS=(--device cpu)
  export TRITON_INTERPRET=1  # the NF4 kernel's plain-Triton twin, as the CPU tests run it
fi
declare -A CAP=([train]=180 [accelerate]=120 [accelerate-train]=180 [pytest]=330)   # seconds at most per launch
declare -A RESERVE=([train]=90 [accelerate]=60 [accelerate-train]=90 [pytest]=200)  # kept back for launches to come
HAS_SMI=0
command -v nvidia-smi >/dev/null 2>&1 && HAS_SMI=1
if command -v torchrun >/dev/null 2>&1; then TORCHRUN=(torchrun); else TORCHRUN=("$PY" -m torch.distributed.run); fi
if command -v accelerate >/dev/null 2>&1; then ACCELERATE=(accelerate)
else ACCELERATE=("$PY" -m accelerate.commands.accelerate_cli); fi
FSDP_T0=$(date +%s)
export FSDP_T0

# -----------------------------------------------------------------------------------------------------------------
# report.py record NAME ...: one launch's record (with what its command wrote); report.py write FILE: the report.
cat >"$WORK/report.py" <<'PYEOF'
import glob, json, os, re, shlex, sys, time
import xml.etree.ElementTree as ET

work, mode = sys.argv[1], sys.argv[2]


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def gpu_memory(path):
    """nvidia-smi samples ("index, MiB" lines) -> the peak and the first sample of each GPU."""
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return None
    peak, first = {}, {}
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            gpu, mib = f"gpu{parts[0]}", int(parts[1])
            first.setdefault(gpu, mib)
            peak[gpu] = max(peak.get(gpu, 0), mib)
    return {"peak_used_mib": peak, "first_sample_mib": first, "samples": len(lines)} if peak else None


def train_result(folder):
    """quickloris train's metrics.json / config.json: per-step records, summary, evaluations, FSDP plan."""
    m, c = read_json(f"{folder}/metrics.json"), read_json(f"{folder}/config.json") or {}
    if m is None:
        return None
    steps = m.get("steps", [])
    return {"summary": m.get("summary"), "losses": [s["loss"] for s in steps],
            "step_seconds": [s["seconds"] for s in steps], "grad_norms": [round(s["grad_norm"], 4) for s in steps],
            "memory_gib_rank0": [s["memory_gib"] for s in steps],
            "eval": {k: {x: v.get(x) for x in ("accuracy", "correct", "total")}
                     for k, v in (m.get("eval") or {}).items()},
            "wall_seconds": m.get("wall_seconds"), "resolved": c.get("resolved"),
            "data_stats": {k: v for k, v in (c.get("data_stats") or {}).items() if k != "dropped_sources"},
            "adapter_files": sorted(os.listdir(f"{folder}/adapter")) if os.path.isdir(f"{folder}/adapter") else []}


def accelerate_result(folder, log):
    """examples/fsdp_two_gpus.py's run_summary.json (losses, sharding, evals) + its lines about ranks and totals."""
    out = {"run_summary": read_json(f"{folder}/run_summary.json")}
    try:
        text = open(log, errors="replace").read()
    except OSError:
        text = ""
    for key, pattern in (("ranks_line", r"^\d+ ranks on .*$"), ("trainer_totals", r"^\{'train_runtime'.*\}$"),
                         ("trained_line", r"^trained \d+ steps .*$")):
        found = re.findall(pattern, text, re.M)
        if found:
            out[key] = found[-1]
    return out if any(out.values()) else None


def pytest_result(xml):
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = []
    for tc in suite.iter("testcase"):
        outcome, msg = "passed", None
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome, msg = tag, ((el.get("message") or "") + "\n" + (el.text or ""))[-3000:]
        cases.append({"test": f"{tc.get('classname')}::{tc.get('name')}", "outcome": outcome,
                      "seconds": round(float(tc.get("time") or 0), 1), **({"message": msg} if msg else {})})
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"cases": cases}


if mode == "record":  # record NAME EXIT_STATUS WALL_S LIMIT_S LOGNAME -- COMMAND...
    name, rc, wall, limit, log = sys.argv[3:8]
    rec = {"name": name, "command": shlex.join(sys.argv[9:]), "exit_status": int(rc),
           "timed_out": int(rc) in (124, 137), "limit_s": int(limit), "wall_s": float(wall), "log": log,
           "gpu_memory": gpu_memory(f"{work}/{name}.smi"),
           "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if name in ("train", "accelerate-train"):
        rec["result"] = r = train_result(f"{work}/{name}")
        if r and (r["summary"] or {}).get("loss_first") is not None:
            s = r["summary"]
            print(f"[{name}] {s['steps']} steps: loss {s['loss_first']:.4f} -> {s['loss_last']:.4f} (first/last "
                  f"{s['loss_window']}), {s['tokens_per_s']} tokens/s, peak {s['peak_memory_gib']} GiB on rank 0; "
                  + ", ".join(f"exact match {k} {v['accuracy']}" for k, v in r["eval"].items()))
    elif name == "accelerate":
        rec["result"] = r = accelerate_result(f"{work}/accelerate", os.path.join(os.environ["OUT"], log))
        s = (r or {}).get("run_summary")
        if s and s.get("losses"):
            print(f"[accelerate] {s['world_size']} ranks, {len(s['losses'])} steps: loss {s['losses'][0]:.4f} -> "
                  f"{s['losses'][-1]:.4f}, trained in {s['train_s']:.1f} s")
    elif name == "pytest":
        rec["result"] = r = pytest_result(f"{work}/pytest.xml")
        if r:
            if r["tests"] == r["skipped"]:
                rec["note"] = "every selected test was skipped"
            print("[pytest] " + ", ".join(f"{c['test'].split('::')[-1]} {c['outcome']} ({c['seconds']} s)"
                                          for c in r["cases"]))
    if rec["gpu_memory"]:
        print(f"[{name}] GPU memory used, peak per GPU (MiB): {rec['gpu_memory']['peak_used_mib']}")
    with open(f"{work}/launch-{name}.json", "w") as f:
        json.dump(rec, f, indent=1)
else:  # write FILE
    order = {"train": 0, "accelerate": 1, "accelerate-train": 2, "pytest": 3}
    launches = sorted(filter(None, map(read_json, glob.glob(f"{work}/launch-*.json"))),
                      key=lambda rec: order.get(rec["name"], 9))
    report = {"script": "scripts/device/fsdp_launchers.sh",
              "commit": os.environ.get("QUICKLORIS_COMMIT", "unknown"),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "elapsed_s": int(time.time()) - int(os.environ["FSDP_T0"]),
              "environment": read_json(f"{work}/environment.json"), "model": read_json(f"{work}/model.json"),
              "launches": {rec["name"]: rec for rec in launches},
              "failed": [rec["name"] for rec in launches if rec["exit_status"] != 0],
              "all_passed": bool(launches) and all(rec["exit_status"] == 0 for rec in launches)}
    with open(sys.argv[3] + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(sys.argv[3] + ".tmp", sys.argv[3])
PYEOF

# -----------------------------------------------------------------------------------------------------------------
# The model folder (random-init Llama + tokenizer), environment.json (versions, GPUs) and model.json (its shape).
make_model() {
  timeout -k 10 180 "$PY" - "$MODEL" "${FSDP_SHAPE:-1024,8,2816,16,4}" "$WORK" "$NPROC" <<'PYEOF'
import json, sys, time

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from quickloris.data.tasks import TASKS

folder, shape, work, nproc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
hidden, layers, inter, heads, kv = (int(x) for x in shape.split(","))
t0 = time.perf_counter()
env = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
       "gpu_names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
for name in ("transformers", "accelerate", "peft", "trl", "datasets", "bitsandbytes", "triton"):
    try:
        env[name] = __import__(name).__version__
    except Exception as e:  # noqa: BLE001 - provenance only
        env[name] = f"unavailable ({type(e).__name__})"
json.dump(env, open(f"{work}/environment.json", "w"), indent=1)

# Byte-level BPE, one token per digit (as the embedded tasks need), trained on the tasks' own text; ChatML template.
corpus = ["system user assistant"] * 10
for task in TASKS.values():
    corpus += [m["content"] for ex in task.generate("train", 300, seed=1) for m in ex.messages()]
tk = Tokenizer(models.BPE())
tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False)])
tk.decoder = decoders.ByteLevel()
tk.train_from_iterator(corpus, trainers.BpeTrainer(
    vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                           chat_template=chatml)

cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter,
                               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                               head_dim=hidden // heads, max_position_embeddings=2048, tie_word_embeddings=True,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(folder)
tok.save_pretrained(folder)

# The rule of quickloris.parallel.fsdp.sharding_plan: a shard holds whole 16384-value groups.
shapes = [tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
info = {"kind": "random-init LlamaForCausalLM, bf16 safetensors, ChatML byte-level BPE; made on this machine",
        "hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": inter, "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": len(tok), "parameters": sum(p.numel() for p in model.parameters()),
        "linear_weights": len(shapes),
        f"linear_weights_splittable_over_{nproc}": sum(o % nproc == 0 and o // nproc * i % 16384 == 0
                                                       for o, i in shapes),
        "seconds": round(time.perf_counter() - t0, 1)}
json.dump(info, open(f"{work}/model.json", "w"), indent=1)
print("model folder:", json.dumps(info))
PYEOF
}

# -----------------------------------------------------------------------------------------------------------------
# run_launch NAME LOGNAME COMMAND...: a time limit within the budget, nvidia-smi sampling, exit status, wall time.
sample_gpus() {  # one complete nvidia-smi call per sample: nothing sits in a buffer when the sampler is stopped
  while nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits; do sleep 0.5; done
}
status=0
run_launch() {
  local name=$1 log=$2
  shift 2
  local l seen=0 later=0 limit smi_pid="" t1 t2 rc wall
  for l in "${LAUNCHES[@]}"; do
    [ "$seen" = 1 ] && later=$(( later + ${RESERVE[$l]:-60} ))
    [ "$l" = "$name" ] && seen=1
  done
  limit=$(( BUDGET_S - ($(date +%s) - FSDP_T0) - later ))
  [ "$limit" -gt "${CAP[$name]}" ] && limit=${CAP[$name]}
  [ "$limit" -lt 30 ] && limit=30
  echo "--- $name (limit $limit s): $*"
  if [ "$HAS_SMI" = 1 ]; then
    sample_gpus >"$WORK/$name.smi" 2>&1 &
    smi_pid=$!
  fi
  t1=$(date +%s.%N)
  timeout -k 20 "$limit" "$@" </dev/null >"$OUT/$log" 2>&1
  rc=$?
  t2=$(date +%s.%N)
  if [ -n "$smi_pid" ]; then
    kill "$smi_pid" 2>/dev/null
    wait "$smi_pid" 2>/dev/null
  fi
  wall=$(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.1f", b - a }')
  [ "$rc" = 124 ] && echo "=== $name: stopped at its time limit of $limit s ===" >>"$OUT/$log"
  tail -n 6 "$OUT/$log" | cut -c1-300
  OUT="$OUT" "$PY" "$WORK/report.py" "$WORK" record "$name" "$rc" "$wall" "$limit" "$log" -- "$@"
  "$PY" "$WORK/report.py" "$WORK" write "$SUMMARY"
  echo "--- $name: exit $rc in $wall s"
  [ "$rc" = 0 ] || status=1
}

echo "fsdp launchers: ${LAUNCHES[*]}; $NPROC processes${FSDP_DEVICE:+ on $FSDP_DEVICE}; budget $BUDGET_S s"
make_model || echo "making the model folder failed (exit $?): train and accelerate will fail on it"
"$PY" "$WORK/report.py" "$WORK" write "$SUMMARY"
for launch in "${LAUNCHES[@]}"; do
  case "$launch" in
    train)
      run_launch train fsdp_train.log "${TORCHRUN[@]}" --standalone --nproc-per-node "$NPROC" \
        -m quickloris train --fsdp --model "$MODEL" --output-dir "$WORK/train" --max-steps "$STEPS" \
        --batch-size 8 --num-eval "${FSDP_NUM_EVAL:-64}" --no-compile --log-every 1 --no-progress \
        ${DEVICE_ARGS[@]+"${DEVICE_ARGS[@]}"} ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"} ;;
    accelerate)
      run_launch accelerate fsdp_accelerate.log "${ACCELERATE[@]}" launch \
        --config_file examples/fsdp_accelerate.yaml examples/fsdp_two_gpus.py --model "$MODEL" --trainer sft \
        --steps "$STEPS" --eval 20 --out "$WORK/accelerate" \
        ${DEVICE_ARGS[@]+"${DEVICE_ARGS[@]}"} ${ACCEL_EXTRA[@]+"${ACCEL_EXTRA[@]}"} ;;
    accelerate-train)
      run_launch accelerate-train fsdp_accelerate_train.log "${ACCELERATE[@]}" launch \
        --config_file examples/fsdp_accelerate.yaml -m quickloris train --fsdp --model "$MODEL" \
        --output-dir "$WORK/accelerate-train" --max-steps "$STEPS" --batch-size 8 --num-eval "${FSDP_NUM_EVAL:-64}" \
        --no-compile --log-every 1 --no-progress \
        ${DEVICE_ARGS[@]+"${DEVICE_ARGS[@]}"} ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"} ;;
    pytest)
      run_launch pytest fsdp_pytest.log "$PY" -m pytest -q -rA -m "gpu or multigpu" \
        tests/parallel/test_fsdp_example.py -p no:cacheprovider --junitxml "$WORK/pytest.xml" --durations 5 ;;
    *)
      echo "unknown launch $launch (choose from: train accelerate accelerate-train pytest)"; status=1 ;;
  esac
done
echo "fsdp launchers: done in $(( $(date +%s) - FSDP_T0 )) s, exit $status; report: $SUMMARY"
rm -rf "$WORK"
exit "$status"
