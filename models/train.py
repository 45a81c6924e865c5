#!/usr/bin/env python3
"""Train the rul-cnn-fd001 reference model (1-D CNN RUL regressor on NASA C-MAPSS FD001)
and export it to ONNX together with golden test vectors and metrics.

Run from the repository root:

    /work/venv/bin/python models/train.py --data ../shared/data/cmapss --out models/rul-cnn-fd001

Protocol (the usual one in the C-MAPSS literature):
  * 14 informative sensors, in this order: s2 s3 s4 s7 s8 s9 s11 s12 s13 s14 s15 s17 s20 s21
  * sliding windows of 30 cycles (window ending at cycle t uses cycles t-29..t)
  * target = piecewise-linear RUL, min(max_cycle(unit) - t, 125)
  * ~10% of the training units held out (by unit) for validation / early stopping
  * test score = RMSE over the 100 test units of the prediction for each unit's last window
    against RUL_FD001.txt (uncapped; a capped-truth variant is reported too)

The exported ONNX graph takes RAW sensor values: the per-feature mean/std computed on
train_FD001 are baked into the graph as constants ((x - mean) / std before the conv layers).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn

# ----------------------------------------------------------------------------- constants
SENSORS = ["s2", "s3", "s4", "s7", "s8", "s9", "s11", "s12", "s13", "s14", "s15", "s17", "s20", "s21"]
# Units per the data README (Saxena et al. 2008, Table 2); "-" = dimensionless.
SENSOR_UNITS = {
    "s2": "degR", "s3": "degR", "s4": "degR",
    "s7": "psia", "s8": "rpm", "s9": "rpm",
    "s11": "psia", "s12": "pps/psi", "s13": "rpm", "s14": "rpm",
    "s15": "-", "s17": "-", "s20": "lbm/s", "s21": "lbm/s",
}
# Column index (0-based) in the 26-column file: unit, cycle, setting1..3, s1..s21.
SENSOR_COLS = [4 + int(s[1:]) for s in SENSORS]  # s1 -> col 5
WINDOW = 30
N_FEAT = len(SENSORS)
RUL_CAP = 125.0
N_GOLDEN = 8
OPSET = 17


# ----------------------------------------------------------------------------- data
def load_cmapss(path: str) -> np.ndarray:
    """Whitespace-separated, no header, 26 columns (lines end with two spaces)."""
    rows = []
    with open(path, "r", encoding="ascii") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 26:
                raise ValueError(f"{path}: expected 26 fields, got {len(parts)}")
            rows.append([float(p) for p in parts])
    return np.asarray(rows, dtype=np.float64)


def split_units(data: np.ndarray) -> dict[int, np.ndarray]:
    """unit id -> (n_cycles, 14) float32 raw sensor matrix, sorted by cycle."""
    out = {}
    for u in np.unique(data[:, 0]).astype(int):
        d = data[data[:, 0] == u]
        d = d[np.argsort(d[:, 1])]
        if not np.array_equal(d[:, 1], np.arange(1, len(d) + 1)):
            raise ValueError(f"unit {u}: cycles are not 1..n")
        out[int(u)] = d[:, SENSOR_COLS].astype(np.float32)
    return out


def make_train_windows(units: dict[int, np.ndarray], ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for u in ids:
        x = units[u]
        n = len(x)
        if n < WINDOW:
            raise ValueError(f"train unit {u} shorter than window ({n} < {WINDOW})")
        for end in range(WINDOW, n + 1):  # end = cycle t (1-based), window = cycles t-29..t
            xs.append(x[end - WINDOW:end])
            ys.append(min(float(n - end), RUL_CAP))
    return np.stack(xs).astype(np.float32), np.asarray(ys, dtype=np.float32)


def last_window(x: np.ndarray) -> np.ndarray:
    """Window of the last 30 cycles. (FD001 test units have >= 31 cycles; shorter ones
    would be front-padded with their first row, which never happens for FD001.)"""
    if len(x) < WINDOW:
        x = np.concatenate([np.repeat(x[:1], WINDOW - len(x), axis=0), x], axis=0)
    return x[-WINDOW:].astype(np.float32)


# ----------------------------------------------------------------------------- model
class RulCnn(nn.Module):
    """[batch, 30, 14] raw sensors -> normalise -> [batch, 14, 30] -> 4x Conv1d+ReLU
    -> Flatten -> Linear+ReLU -> Linear -> ReLU -> [batch, 1] RUL (cycles)."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, ch: int = 32, n_conv: int = 3, out_ch: int = 16,
                 kernel: int = 5, head: int = 64, dropout: float = 0.2):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, 1, N_FEAT))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, 1, N_FEAT))
        if kernel % 2 != 1:
            raise ValueError("kernel must be odd (symmetric 'same' padding)")
        p = kernel // 2  # 'same' padding as explicit ints -> plain ONNX Conv with pads, length stays 30
        layers, c_in = [], N_FEAT
        for c_out in [ch] * n_conv + [out_ch]:
            layers += [nn.Conv1d(c_in, c_out, kernel, padding=p), nn.ReLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),                 # [batch, out_ch*30]
            nn.Dropout(dropout),
            nn.Linear(out_ch * WINDOW, head), nn.ReLU(),
            nn.Linear(head, 1),
            nn.ReLU(),                    # RUL >= 0
        )

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        x = (window - self.mean) / self.std   # raw units -> z-scores (constants baked in)
        x = x.transpose(1, 2)                 # [batch, 14, 30] for Conv1d (channels = sensors)
        return self.head(self.features(x))


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- training
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, bs: int = 2048) -> np.ndarray:
    model.eval()
    out = [model(torch.from_numpy(x[i:i + bs])).numpy()[:, 0] for i in range(0, len(x), bs)]
    return np.concatenate(out)


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(math.sqrt(np.mean((a - b) ** 2)))


def train(args) -> None:
    t0 = time.time()
    seed_everything(args.seed)
    os.makedirs(args.out, exist_ok=True)

    train_raw = load_cmapss(os.path.join(args.data, "train_FD001.txt"))
    test_raw = load_cmapss(os.path.join(args.data, "test_FD001.txt"))
    with open(os.path.join(args.data, "RUL_FD001.txt")) as f:
        rul_true = np.asarray([float(l.split()[0]) for l in f if l.strip()], dtype=np.float64)

    # Normalisation constants: all rows of train_FD001, the 14 sensors (population std).
    feats = train_raw[:, SENSOR_COLS]
    mean = feats.mean(axis=0).astype(np.float32)
    std = feats.std(axis=0).astype(np.float32)
    std = np.where(std == 0, np.float32(1.0), std).astype(np.float32)

    train_units = split_units(train_raw)
    test_units = split_units(test_raw)
    assert len(test_units) == len(rul_true) == 100, (len(test_units), len(rul_true))

    # Hold out ~10% of the training units (by unit, seeded).
    ids = sorted(train_units)
    perm = np.random.RandomState(args.seed).permutation(ids).tolist()
    n_val = max(1, round(0.1 * len(ids)))
    val_ids = sorted(perm[:n_val])
    tr_ids = sorted(perm[n_val:])
    x_tr, y_tr = make_train_windows(train_units, tr_ids)
    x_va, y_va = make_train_windows(train_units, val_ids)
    print(f"train units {len(tr_ids)} ({len(x_tr)} windows), val units {len(val_ids)} ({len(x_va)} windows): {val_ids}")

    model = RulCnn(mean, std, ch=args.channels, n_conv=args.n_conv, out_ch=args.out_channels,
                   kernel=args.kernel, head=args.head, dropout=args.dropout)
    with torch.no_grad():  # start the output near the mean target so the final ReLU is active
        model.head[-2].bias.fill_(float(y_tr.mean()))
    params = n_params(model)
    print(f"params: {params}")
    assert params < 50_000

    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=6)
    loss_fn = nn.MSELoss()
    gen = torch.Generator().manual_seed(args.seed)
    xt = torch.from_numpy(x_tr)
    yt = torch.from_numpy(y_tr).unsqueeze(1)

    best_val, best_state, best_epoch, bad = float("inf"), None, 0, 0
    epochs_run = 0
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        tot = 0.0
        for i in range(0, len(order), args.batch):
            idx = order[i:i + args.batch]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            tot += loss.item() * len(idx)
        epochs_run = epoch
        val = rmse(predict(model, x_va), y_va)
        sched.step(val)
        improved = val < best_val - 1e-4
        if improved:
            best_val, best_epoch, bad = val, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
        print(f"epoch {epoch:3d}  train_rmse {math.sqrt(tot / len(xt)):7.3f}  val_rmse {val:7.3f}"
              f"  lr {opt.param_groups[0]['lr']:.2e}{'  *' if improved else ''}  ({time.time() - t0:.0f}s)",
              flush=True)
        if bad >= args.patience:
            print(f"early stop: no val improvement for {args.patience} epochs")
            break
    model.load_state_dict(best_state)
    model.eval()
    train_seconds = time.time() - t0
    print(f"best epoch {best_epoch}, val_rmse {best_val:.4f}, training took {train_seconds:.1f}s")

    # ------------------------------------------------------------------------- export
    import onnx
    import onnxruntime as ort

    onnx_path = os.path.join(args.out, "model.onnx")
    dummy = torch.from_numpy(np.stack([last_window(test_units[1])]))
    export_kwargs = dict(
        input_names=["window"], output_names=["rul"],
        dynamic_axes={"window": {0: "batch"}, "rul": {0: "batch"}},
        opset_version=OPSET, do_constant_folding=True,
    )
    try:
        torch.onnx.export(model, (dummy,), onnx_path, dynamo=False, **export_kwargs)
    except TypeError:  # older torch without the `dynamo` kwarg (legacy exporter is the default)
        torch.onnx.export(model, (dummy,), onnx_path, **export_kwargs)
    m = onnx.load(onnx_path)
    onnx.checker.check_model(m, full_check=True)

    # Graph I/O contract: window [batch, 30, 14] f32 (batch symbolic, 30/14 concrete); rul [batch, 1] f32.
    def dims(vi):
        return [d.dim_param if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]
    gi, go = m.graph.input, m.graph.output
    assert [i.name for i in gi] == ["window"], [i.name for i in gi]
    assert [o.name for o in go] == ["rul"], [o.name for o in go]
    assert dims(gi[0]) == ["batch", WINDOW, N_FEAT], dims(gi[0])
    assert dims(go[0]) == ["batch", 1], dims(go[0])
    assert gi[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert go[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    op_types = sorted({n.op_type for n in m.graph.node})
    print(f"ONNX opset {m.opset_import[0].version}; input {dims(gi[0])}, output {dims(go[0])}")
    print(f"ONNX op types: {op_types}")

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_path, sess_options=so, providers=["CPUExecutionProvider"])

    def ort_one(w: np.ndarray) -> float:
        return float(sess.run(["rul"], {"window": w[None].astype(np.float32)})[0][0, 0])

    # Test score: last window of each of the 100 test units, batch 1 on onnxruntime.
    test_ids = sorted(test_units)
    last = np.stack([last_window(test_units[u]) for u in test_ids])
    pred = np.asarray([ort_one(w) for w in last], dtype=np.float64)
    test_rmse = rmse(pred, rul_true)
    test_rmse_capped = rmse(pred, np.minimum(rul_true, RUL_CAP))
    print(f"test_FD001 last-cycle RMSE: {test_rmse:.4f} (capped truth: {test_rmse_capped:.4f})")

    # Consistency checks: ORT batch-1 vs ORT batch-4 vs batch-100 vs torch.
    b4 = sess.run(["rul"], {"window": last[:4]})[0]
    assert b4.shape == (4, 1) and b4.dtype == np.float32
    assert np.allclose(b4[:, 0], pred[:4], rtol=1e-5, atol=1e-4), (b4[:, 0], pred[:4])
    b100 = sess.run(["rul"], {"window": last})[0][:, 0]
    assert np.allclose(b100, pred, rtol=1e-5, atol=1e-4)
    pt = predict(model, last)
    assert np.allclose(pt, pred, rtol=1e-4, atol=1e-3), np.abs(pt - pred).max()
    print(f"batch-4 vs batch-1 max |diff| {np.abs(b4[:, 0] - pred[:4]).max():.3g}; "
          f"batch-100 vs batch-1 {np.abs(b100 - pred).max():.3g}; torch vs ORT {np.abs(pt - pred).max():.3g}")

    with open(os.path.join(args.out, "test_fd001_last_cycle_predictions.csv"), "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["unit", "true_rul", "predicted"])
        for u, t, p in zip(test_ids, rul_true, pred):
            w.writerow([u, int(t), repr(float(np.float32(p)))])

    # Golden cases: last window of test units 1..8 (raw units), ORT CPU batch 1.
    cases = []
    for u in test_ids[:N_GOLDEN]:
        win = last_window(test_units[u])
        cases.append({
            "input": [float(v) for v in win.reshape(-1)],
            "output": [float(np.float32(ort_one(win)))],
        })
    with open(os.path.join(args.out, "golden.json"), "w") as f:
        json.dump({"input_shape": [WINDOW, N_FEAT], "output_shape": [1], "cases": cases}, f)
        f.write("\n")

    with open(os.path.join(args.out, "features.json"), "w") as f:
        json.dump({
            "features": [{"name": s, "unit": SENSOR_UNITS[s], "mean": float(mean[i]), "std": float(std[i])}
                         for i, s in enumerate(SENSORS)],
            "window": WINDOW,
        }, f, indent=2)
        f.write("\n")

    metrics = {
        "test_fd001_last_cycle_rmse": test_rmse,
        "test_fd001_last_cycle_rmse_capped_truth": test_rmse_capped,
        "val_rmse": best_val,
        "params": params,
        "epochs": epochs_run,
        "onnxruntime_version": ort.__version__,
        "torch_version": torch.__version__,
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")

    print(json.dumps(metrics, indent=2))
    print(f"best epoch {best_epoch} of {epochs_run}; val units {val_ids}; total time {time.time() - t0:.1f}s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder with train_FD001.txt, test_FD001.txt, RUL_FD001.txt")
    ap.add_argument("--out", required=True, help="output folder (model.onnx, golden.json, metrics.json, ...)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--epochs", type=int, default=120, help="max epochs (early stopping on val RMSE)")
    ap.add_argument("--patience", type=int, default=20)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--channels", type=int, default=32, help="channels of the hidden conv layers")
    ap.add_argument("--n-conv", type=int, default=3, help="number of hidden conv layers (plus one output conv)")
    ap.add_argument("--out-channels", type=int, default=16, help="channels of the last conv layer")
    ap.add_argument("--kernel", type=int, default=5, help="conv kernel size (odd)")
    ap.add_argument("--head", type=int, default=64, help="width of the dense hidden layer")
    ap.add_argument("--dropout", type=float, default=0.2)
    train(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
