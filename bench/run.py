"""sdjax against diffusers/PyTorch, side by side on this machine: one command, a table and a JSON file.

    python -m bench [--models sd15,demo] [--dtypes float32,bfloat16] [--repeats 3] [--cases unet_cfg,...]
                    [--no-torch] [--json bench/results.json]

Cases (SD 1.5 architecture with random weights, and the bundled demo model):
  text_encode   the text tower on 2 prompts (prompt + empty)
  unet_cfg      one U-Net call with classifier-free guidance (batch 2) at 256² and 512²
  vae_decode    one latent -> image
  sample        the whole pipeline: text, 25 DPM++ steps with guidance, decode
  train_step    U-Net forward + backward + AdamW at 256², batch 1 (fp32 masters; bf16 = mixed precision)
Memory: XLA's own account of the compiled sdjax function (arguments + outputs + temporaries), and the
growth of the process's peak RSS during the torch warm-up call (PyTorch CPU has no allocator statistics).
FLOPs are XLA's count of the sdjax function (cost_analysis), for `sample` the denoising loop's body
times the number of steps; % peak is sdjax's FLOP/s over a measured 4096² matmul of that dtype.
Each (model, dtype) runs in a fresh process; sdjax and torch alternate within it, after one warm-up
call each, and the median of --repeats timed calls is reported. Train steps run one framework per
process (two copies of the optimizer state would not fit in memory).
"""
import argparse
import importlib.util
import datetime
import json
import os
import platform
import subprocess
import sys

from bench import common
from sdjax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD15_FOLDER = "/tmp/sd15_random"
CASES = ("text_encode", "unet_cfg", "vae_decode", "sample", "train_step")
SPECS = {
    "sd15": [("text_encode", {}), ("unet_cfg", dict(size=256)), ("unet_cfg", dict(size=512)),
             ("vae_decode", dict(size=512)), ("sample", dict(size=256, steps=25)),
             ("train_step", dict(size=256, batch=1))],
    # bench/device.sh on one GPU: 512², 50 DPM++ steps with guidance at batch 1 and 8, the train step at batch 8
    "sd15-device": [("sample", dict(size=512, steps=50, batch=1)), ("sample", dict(size=512, steps=50, batch=8)),
                    ("train_step", dict(size=512, batch=8))],
    "demo": [("text_encode", {}), ("unet_cfg", dict(size=64)), ("vae_decode", dict(size=64)),
             ("sample", dict(size=64, steps=25)), ("train_step", dict(size=64, batch=8))],
}


def folder(model):
    model = model.split("-")[0]  # sd15-device: the SD 1.5 folder
    if model == "demo":
        from sdjax.demo import DEMO_MODEL
        return DEMO_MODEL
    if not os.path.isfile(os.path.join(SD15_FOLDER, "model_index.json")):
        from bench.load_sd15 import write_random_folder
        print(f"writing random SD 1.5 weights to {SD15_FOLDER} (once)", flush=True)
        write_random_folder(SD15_FOLDER)
    return SD15_FOLDER


def peak_extra_rss(case):
    """Run `case` once; returns the growth of the process's peak RSS during the call in bytes (or None)."""
    before = common.rss()
    common.reset_peak_rss()
    case.run()
    peak = common.rss("VmHWM")
    return max(peak - before, 0) if peak and before else None


def child(model, dtype, impls, cases, repeats):
    """Run the cases of one (model, dtype) here, sdjax and torch alternating; print JSON lines."""
    path = folder(model)
    sides = []
    for impl in impls:
        if impl == "sdjax":
            from bench.sdjax_side import Sdjax
            sides.append(Sdjax(path, dtype))
        else:
            from bench.torch_side import Torch
            sides.append(Torch(path, dtype))
    for name, spec in SPECS[model]:
        if name not in cases:
            continue
        built = [(side, getattr(side, name)(spec)) for side in sides]
        extra = {}
        for side, case in built:  # warm-up (sdjax cases compiled when built; the sampling pipeline compiles here)
            host_memory.release_freed_memory()  # what loading or the last case left; only a first call shows its peak
            extra[side.name] = peak_extra_rss(case)
        times = {side.name: [] for side, _ in built}
        for _ in range(repeats):
            for side, case in built:
                times[side.name].append(common.timed(case.run))
        for side, case in built:
            rec = dict(model=model, dtype=dtype, case=name, **spec, impl=side.name, times=times[side.name],
                       median_s=common.median(times[side.name]), flops=case.flops, compile_s=case.compile_s,
                       xla_bytes=case.xla_bytes, peak_extra_rss=extra[side.name])
            if name == "sample" and side.name == "sdjax":
                rec["loop_s_per_step"] = case.loop_s / spec["steps"]
            if side.name == "sdjax":
                from bench.sdjax_side import device_peak_bytes
                rec["device_peak_bytes"] = device_peak_bytes()
            elif side.torch.cuda.is_available():
                rec["device_peak_bytes"] = side.torch.cuda.max_memory_allocated()
            print("RESULT " + json.dumps(rec), flush=True)
        del built


def spawn(args):
    out = subprocess.run([sys.executable, "-m", "bench.run", *args], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=None, env=dict(os.environ, PYTHONPATH=ROOT))
    recs = [json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode:
        print(f"  (bench.run {' '.join(args)} exited with {out.returncode})", flush=True)
    return recs


def machine(dtypes):
    import jax
    from bench.sdjax_side import matmul_peak
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    info = dict(cpu=cpu, cores=os.cpu_count(), platform=jax.devices()[0].platform,
                device=str(jax.devices()[0].device_kind), jax=jax.__version__, python=platform.python_version(),
                matmul_peak_flops={d: matmul_peak(d) for d in dtypes})
    try:
        import diffusers
        import torch
        info.update(torch=torch.__version__, diffusers=diffusers.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip()
    except OSError:
        pass
    return info


def table(records, info):
    """Rows of case | dtype | sdjax | torch | ratio | GFLOP | GFLOP/s | % of peak | compile | memory."""
    by = {}
    for r in records:
        size = r.get("size") and (f"{r['size']}" + (f"x{r['batch']}" if r.get("batch", 1) > 1 else ""))
        by.setdefault((r["model"], r["case"], size, r["dtype"]), {})[r["impl"]] = r
    lines = [f"{'model':5} {'case':11} {'size':>6} {'dtype':8} {'sdjax s':>8} {'torch s':>8} {'ratio':>6} "
             f"{'GFLOP':>8} {'GFLOP/s':>8} {'%peak':>6} {'compile':>7} {'XLA MiB':>8} {'torch MiB':>9}"]
    for (model, case, size, dtype), row in by.items():
        s, t = row.get("sdjax"), row.get("torch")
        ratio = s["median_s"] / t["median_s"] if s and t else None
        fl = s["flops"] if s else None
        rate = fl / s["median_s"] if s and fl else None
        peak = info["matmul_peak_flops"].get(dtype)
        mib = lambda b, w: format(b / 2 ** 20, f"{w}.0f") if b else format("-", f">{w}")  # noqa: E731
        num = lambda x, f: format(x, f) if x is not None else "-"  # noqa: E731
        lines.append(f"{model:5} {case:11} {size or '':>6} {dtype:8} {num(s and s['median_s'], '8.3f'):>8} "
                     f"{num(t and t['median_s'], '8.3f'):>8} {num(ratio, '6.2f'):>6} {num(fl and fl / 1e9, '8.1f'):>8} "
                     f"{num(rate and rate / 1e9, '8.1f'):>8} {num(rate and peak and 100 * rate / peak, '6.1f'):>6} "
                     f"{num(s and s['compile_s'], '7.1f'):>7} {mib(s and s['xla_bytes'], 8)} "
                     f"{mib(t and t['peak_extra_rss'], 9)}")
        if s and "loop_s_per_step" in s:
            unet = by.get((model, "unet_cfg", size, dtype), {}).get("sdjax")
            if unet:
                over = s["loop_s_per_step"] / unet["median_s"] - 1
                lines.append(f"      sampler loop: {s['loop_s_per_step']:.3f} s/step, {100 * over:+.1f}% "
                             f"against the bare guided U-Net call")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sd15,demo")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-torch", action="store_true", help="sdjax only")
    p.add_argument("--json", default=os.path.join(ROOT, "bench", "results.json"))
    p.add_argument("--child", nargs=3, metavar=("MODEL", "DTYPE", "IMPLS"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cases = a.cases.split(",")
    if a.child:
        host_memory.keep_freed_memory()  # both frameworks, as sample.py and train.py do for sdjax
        return child(a.child[0], a.child[1], a.child[2].split(","), cases, a.repeats)
    if all(importlib.util.find_spec(m) for m in ("diffusers", "torch")):
        impls = ["sdjax"] if a.no_torch else ["sdjax", "torch"]
    else:
        impls = ["sdjax"]
        print("diffusers/torch not installed: sdjax only")
    dtypes = a.dtypes.split(",")
    info = machine(dtypes)
    print(json.dumps(info))
    records = []
    for model in a.models.split(","):
        for dtype in dtypes:
            common_args = ["--repeats", str(a.repeats)]
            infer = [c for c in cases if c != "train_step"]
            if infer:
                records += spawn(["--child", model, dtype, ",".join(impls), "--cases", ",".join(infer), *common_args])
            if "train_step" in cases:
                for impl in impls:
                    records += spawn(["--child", model, dtype, impl, "--cases", "train_step", *common_args])
            print(table([r for r in records if r["model"] == model and r["dtype"] == dtype], info), flush=True)
    print("\n" + table(records, info))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(date=datetime.datetime.now().isoformat(timespec="seconds"), machine=info,
                           args=vars(a), results=records), f, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
