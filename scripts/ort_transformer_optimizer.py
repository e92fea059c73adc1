"""onnxruntime's transformer graph optimizer on the shipped glyph model: fuse what it can
(model_type mmdit, then bert), then time plain and optimized sessions against torch eager
(2 threads, 9 interleaved repetitions, median). A measurement for docs/benchmarks.md."""
import time, statistics, os, torch, numpy as np, onnxruntime as ort

import fastflow
from fastflow.export import export_onnx
torch.set_num_threads(2)
spec = fastflow.get_model("glyphs"); model = spec.build().eval()
d = os.environ.get("FASTFLOW_ONNX_DIR", "/tmp/fastflow-onnx-glyphs")
if not os.path.exists(d + "/model.onnx"):
    export_onnx("glyphs", d)
from onnxruntime.transformers import optimizer
from onnxruntime.transformers.fusion_options import FusionOptions
variants = {}
for mt in ("mmdit", "bert"):
    try:
        opts = FusionOptions(mt)
        m = optimizer.optimize_model(d + "/model.onnx", model_type=mt, num_heads=6, hidden_size=192, opt_level=0, optimization_options=opts, use_gpu=False)
        p = f"{d}/opt_{mt}.onnx"; m.save_model_to_file(p)
        print(mt, "fused ops:", m.get_fused_operator_statistics(), flush=True)
        variants[mt] = p
    except Exception as exc:
        print(mt, "failed", type(exc).__name__, exc, flush=True)
def sess(path, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    so = ort.SessionOptions(); so.graph_optimization_level = level
    so.intra_op_num_threads = 2; so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
sessions = {"ort": sess(d + "/model.onnx")}
for k, p in variants.items(): sessions["ort+" + k] = sess(p)
names = [i.name for i in sessions["ort"].get_inputs()]
print("inputs", names, [i.type for i in sessions["ort"].get_inputs()])
for B in (16, 32, 1):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, 32, 32, generator=g); t = torch.rand(B, generator=g); lab = torch.randint(0, 37, (B,), generator=g)
    feeds = dict(zip(names, [x.numpy(), t.numpy(), lab.numpy()]))
    with torch.inference_mode():
        ref = model(x, t, label=lab).numpy()
    fns = {"eager": lambda: model(x, t, label=lab)}
    for k, s in sessions.items():
        out = s.run(None, feeds)[0]
        print(B, k, "max err", float(np.abs(out - ref).max()))
        fns[k] = (lambda s=s: s.run(None, feeds))
    times = {k: [] for k in fns}
    inner = 5 if B > 1 else 30
    with torch.inference_mode():
        for k in fns: fns[k]()
        for r in range(9):
            for k in (list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]):
                st = time.perf_counter()
                for _ in range(inner): fns[k]()
                times[k].append(1000 * (time.perf_counter() - st) / inner)
    e = statistics.median(times["eager"])
    print(B, {k: f"{statistics.median(v):.2f} ms ({e / statistics.median(v):.2f}x)" for k, v in times.items()}, flush=True)
