//! Our ops against PyTorch values (tests/fixtures/ops, scripts/make_op_fixtures.py) and their
//! gradients against central finite differences in f64.

mod common;

use std::path::Path;

use beit::losses;
use beit::nn::{BatchNorm2d, Conv2d, ConvTranspose2d};
use beit::ops;
use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

fn fixtures() -> std::collections::HashMap<String, Tensor> {
    beit::util::load_safetensors(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ops/ops.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    common::max_abs(&(a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap())
}

#[test]
fn forward_values_match_pytorch() {
    let t = fixtures();
    let dims = |y: &Tensor| (y.dim(2).unwrap(), y.dim(3).unwrap());
    for i in 0..5 {
        let (x, y) = (&t[&format!("bilinear{i}.x")], &t[&format!("bilinear{i}.y")]);
        let (h, w) = dims(y);
        let d = max_diff(&ops::bilinear(x, h, w).unwrap(), y);
        assert!(d < 1e-5, "bilinear case {i}: {d}");
        let (x, y) = (&t[&format!("bicubic{i}.x")], &t[&format!("bicubic{i}.y")]);
        let d = max_diff(&ops::bicubic(x, h, w).unwrap(), y);
        assert!(d < 1e-5, "bicubic case {i}: {d}");
    }
    for i in 0..4 {
        let (x, y) = (&t[&format!("adaptive{i}.x")], &t[&format!("adaptive{i}.y")]);
        let (h, w) = dims(y);
        let d = max_diff(&ops::adaptive_avg_pool2d(x, h, w).unwrap(), y);
        assert!(d < 1e-5, "adaptive pool case {i}: {d}");
    }
    for i in 0..2 {
        let (x, y) = (&t[&format!("maxpool{i}.x")], &t[&format!("maxpool{i}.y")]);
        assert_eq!(
            max_diff(&ops::max_pool2d_2x2(x).unwrap(), y),
            0.0,
            "maxpool case {i}"
        );
    }
    let d = max_diff(
        &ops::softmax_last_dim(&t["softmax.x"]).unwrap(),
        &t["softmax.y"],
    );
    assert!(d < 1e-6, "softmax {d}");
    let d = max_diff(
        &ops::layer_norm(
            &t["layernorm.x"],
            &t["layernorm.w"],
            &t["layernorm.b"],
            1e-12,
        )
        .unwrap(),
        &t["layernorm.y"],
    );
    assert!(d < 1e-5, "layer_norm {d}");
    let d = max_diff(&ops::gelu_erf(&t["gelu.x"]).unwrap(), &t["gelu.y"]);
    assert!(d < 1e-6, "gelu {d}");
}

/// Compare d(sum(f(x) * r))/dx from backprop with central differences, in f64.
fn check_grad(name: &str, x: &Tensor, f: &dyn Fn(&Tensor) -> Result<Tensor>) {
    let x = x.to_dtype(DType::F64).unwrap();
    let var = Var::from_tensor(&x).unwrap();
    let y = f(var.as_tensor()).unwrap();
    let r = Tensor::randn(0f64, 1f64, y.shape(), &Device::Cpu).unwrap();
    let loss = (y * &r).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = grads
        .get(var.as_tensor())
        .unwrap_or_else(|| panic!("{name}: no gradient reached the input"))
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let base = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let eps = 1e-6;
    let eval = |v: &[f64]| -> f64 {
        let t = Tensor::from_slice(v, x.shape(), &Device::Cpu).unwrap();
        (f(&t).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let step = (base.len() / 60).max(1);
    let mut worst: f64 = 0.0;
    for i in (0..base.len()).step_by(step) {
        let mut p = base.clone();
        p[i] += eps;
        let mut m = base.clone();
        m[i] -= eps;
        let num = (eval(&p) - eval(&m)) / (2.0 * eps);
        let err = (num - g[i]).abs() / (1.0 + num.abs());
        worst = worst.max(err);
    }
    assert!(worst < 1e-6, "{name}: finite-difference mismatch {worst:e}");
}

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f64, 1f64, shape, &Device::Cpu).unwrap()
}

#[test]
fn gradients_match_finite_differences() {
    check_grad("softmax_last_dim", &randn(&[3, 4, 7]), &|x| {
        ops::softmax_last_dim(x)
    });
    let (w, b) = (randn(&[9]), randn(&[9]));
    check_grad("layer_norm(x)", &randn(&[2, 5, 9]), &|x| {
        ops::layer_norm(x, &w, &b, 1e-6)
    });
    let x = randn(&[2, 5, 9]);
    check_grad("layer_norm(w)", &w, &|w| ops::layer_norm(&x, w, &b, 1e-6));
    check_grad("layer_norm(b)", &b, &|b| ops::layer_norm(&x, &w, b, 1e-6));
    check_grad("gelu_erf", &randn(&[4, 13]), &|x| ops::gelu_erf(x));
    check_grad("bilinear up", &randn(&[1, 2, 5, 4]), &|x| {
        ops::bilinear(x, 9, 7)
    });
    check_grad("bilinear down", &randn(&[1, 2, 9, 8]), &|x| {
        ops::bilinear(x, 4, 3)
    });
    check_grad("bicubic", &randn(&[1, 2, 5, 6]), &|x| ops::bicubic(x, 8, 3));
    check_grad("adaptive_avg_pool2d", &randn(&[1, 2, 7, 9]), &|x| {
        ops::adaptive_avg_pool2d(x, 3, 2)
    });
    check_grad("max_pool2d_2x2", &randn(&[1, 2, 6, 7]), &|x| {
        ops::max_pool2d_2x2(x)
    });
    let labels = Tensor::new(&[1i64, 0, 255, 2], &Device::Cpu).unwrap();
    check_grad("cross_entropy(ignore)", &randn(&[4, 3]), &|x| {
        losses::cross_entropy(x, &labels, Some(255))
    });
    let targets = Tensor::new(&[[0f64, 1., 1.], [1., 0., 0.5]], &Device::Cpu).unwrap();
    check_grad("bce_with_logits", &randn(&[2, 3]), &|x| {
        losses::bce_with_logits(x, &targets)
    });
}

#[test]
fn layer_gradients_match_finite_differences() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
    let conv = Conv2d::new(3, 4, 3, 1, 1, 1, true, 0.5, vb.pp("c")).unwrap();
    check_grad("conv2d 3x3", &randn(&[2, 3, 5, 6]), &|x| conv.forward(x));
    let conv1 = Conv2d::new(3, 4, 1, 1, 0, 1, true, 0.5, vb.pp("c1")).unwrap();
    check_grad("conv2d 1x1", &randn(&[2, 3, 5, 6]), &|x| conv1.forward(x));
    let convt = ConvTranspose2d::new(3, 2, 2, 2, 0.5, vb.pp("t")).unwrap();
    check_grad("conv_transpose2d", &randn(&[2, 3, 3, 4]), &|x| {
        convt.forward(x)
    });
    let bn = BatchNorm2d::new(3, vb.pp("bn")).unwrap();
    check_grad("batch_norm train", &randn(&[2, 3, 4, 5]), &|x| {
        bn.forward_t(x, true)
    });
    check_grad("batch_norm eval", &randn(&[2, 3, 4, 5]), &|x| {
        bn.forward_t(x, false)
    });
    check_grad("drop_path", &randn(&[4, 3, 2]), &|x| {
        ops::rng::seed(11); // the same mask for every evaluation
        ops::drop_path(x, 0.3, true)
    });
    check_grad("dropout", &randn(&[4, 6]), &|x| {
        ops::rng::seed(12);
        ops::dropout(x, 0.3, true)
    });
}

#[test]
fn batch_norm_updates_running_statistics_like_pytorch() {
    // PyTorch: running = 0.9 * running + 0.1 * batch stat (unbiased variance).
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let bn = BatchNorm2d::new(2, vb).unwrap();
    let x = Tensor::new(&[[[[1f32, 2.], [3., 4.]], [[0., 0.], [0., 8.]]]], &dev).unwrap();
    bn.forward_t(&x, true).unwrap();
    let mean = bn.running_mean.to_vec1::<f32>().unwrap();
    let var = bn.running_var.to_vec1::<f32>().unwrap();
    // channel 0: mean 2.5, unbiased var 1.6667; channel 1: mean 2, unbiased var 16
    assert!(
        (mean[0] - 0.25).abs() < 1e-6 && (mean[1] - 0.2).abs() < 1e-6,
        "{mean:?}"
    );
    assert!(
        (var[0] - (0.9 + 0.1 * 5.0 / 3.0)).abs() < 1e-5 && (var[1] - (0.9 + 1.6)).abs() < 1e-5,
        "{var:?}"
    );
}

#[test]
fn fused_training_ops_match_finite_differences_and_the_composition() {
    use beit::ops::fused;
    let (w, b) = (randn(&[5, 7]), randn(&[5]));
    let x = randn(&[2, 3, 7]);
    check_grad("fused linear (x)", &x, &|x| fused::linear(x, &w, Some(&b)));
    check_grad("fused linear (w)", &w, &|w| fused::linear(&x, w, Some(&b)));
    check_grad("fused linear (b)", &b, &|b| fused::linear(&x, &w, Some(b)));
    check_grad("fused linear no bias (w)", &w, &|w| {
        fused::linear(&x, w, None)
    });
    // The second shape has more inputs than outputs and many rows: the weight is read through a
    // transposed copy.
    for (w, x) in [(w, x), (randn(&[5, 9]), randn(&[2, 40, 9]))] {
        let want = x
            .broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        assert!(max_diff(&fused::linear(&x, &w, Some(&b)).unwrap(), &want) < 1e-12);
        check_grad("fused linear (w), both layouts", &w, &|w| {
            fused::linear(&x, w, Some(&b))
        });
    }

    let (r, h, l) = (randn(&[2, 3, 4]), randn(&[2, 3, 4]), randn(&[4]));
    check_grad("scaled residual (r)", &r, &|r| {
        fused::scaled_residual(r, &h, Some(&l), 0.0, true)
    });
    check_grad("scaled residual (h)", &h, &|h| {
        fused::scaled_residual(&r, h, Some(&l), 0.0, true)
    });
    check_grad("scaled residual (lambda)", &l, &|l| {
        fused::scaled_residual(&r, &h, Some(l), 0.0, true)
    });
    // With the drop path inside the node: 6 samples of 300 rows (blocks of 256 rows straddle
    // samples), against the composition with the same draws, and its gradients.
    let (r, h, l) = (randn(&[6, 300, 3]), randn(&[6, 300, 3]), randn(&[3]));
    let with_drop = |r: &Tensor, h: &Tensor, l: &Tensor| {
        ops::rng::seed(13); // the same draws for every evaluation
        fused::scaled_residual(r, h, Some(l), 0.5, true)
    };
    ops::rng::seed(13);
    let want = (&r
        + ops::drop_path(&h, 0.5, true)
            .unwrap()
            .broadcast_mul(&l)
            .unwrap())
    .unwrap();
    let got = with_drop(&r, &h, &l).unwrap();
    assert!(max_diff(&got, &want) < 1e-12, "drop path inside the node");
    let dropped = (&got - &r).unwrap().abs().unwrap().sum((1, 2)).unwrap();
    let dropped = dropped.to_vec1::<f64>().unwrap();
    assert!(
        dropped.contains(&0.0) && dropped.iter().any(|&v| v > 0.0),
        "p = 0.5 over 6 samples should drop some and keep some: {dropped:?}"
    );
    let inference = fused::scaled_residual(&r, &h, Some(&l), 0.5, false).unwrap();
    let plain = (&r + h.broadcast_mul(&l).unwrap()).unwrap();
    assert!(
        max_diff(&inference, &plain) < 1e-12,
        "no drop path outside training"
    );
    let (rs, hs) = (r.narrow(1, 0, 2).unwrap(), h.narrow(1, 0, 2).unwrap());
    check_grad("scaled residual + drop path (h)", &hs, &|h| {
        with_drop(&rs, h, &l)
    });
    check_grad("scaled residual + drop path (lambda)", &l, &|l| {
        with_drop(&rs, &hs, l)
    });

    // Attention core: against the composition, and its gradients.
    let (bsz, s, heads, hd) = (2, 5, 2, 3);
    let d = heads * hd;
    let qkv = randn(&[bsz, s, 3 * d]);
    let bias1 = randn(&[1, heads, s, s]);
    let bias_b = randn(&[bsz, heads, s, s]);
    let scale = 0.7;
    let plain = |qkv: &Tensor, bias: Option<&Tensor>| -> Result<Tensor> {
        let split = |i: usize| {
            qkv.narrow(2, i * d, d)?
                .reshape((bsz, s, heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let mut sc = (q.matmul(&k.t()?)? * scale)?;
        if let Some(b) = bias {
            sc = sc.broadcast_add(b)?;
        }
        let p = candle_nn::ops::softmax(&sc, candle_core::D::Minus1)?;
        p.matmul(&v)?.transpose(1, 2)?.reshape((bsz, s, d))
    };
    for bias in [None, Some(&bias1), Some(&bias_b)] {
        let got = fused::attention(&qkv, bias, heads, scale).unwrap().unwrap();
        assert!(max_diff(&got, &plain(&qkv, bias).unwrap()) < 1e-12);
        // f32 (the vectorised softmax rows with the scale and bias fused in) against f64.
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let got32 = fused::attention(&f32(&qkv), bias.map(f32).as_ref(), heads, scale)
            .unwrap()
            .unwrap();
        let want = plain(&qkv, bias).unwrap();
        assert!(max_diff(&got32.to_dtype(DType::F64).unwrap(), &want) < 1e-5);
        check_grad("fused attention (qkv)", &qkv, &|t| {
            Ok(fused::attention(t, bias, heads, scale)?.unwrap())
        });
    }
    check_grad("fused attention (shared bias)", &bias1, &|b| {
        Ok(fused::attention(&qkv, Some(b), heads, scale)?.unwrap())
    });
    check_grad("fused attention (per-sample bias)", &bias_b, &|b| {
        Ok(fused::attention(&qkv, Some(b), heads, scale)?.unwrap())
    });
    // A shared bias's gradient is summed over the batch inside the backward, 4 images per task
    // (tasks 4 + 4 + 1 here), then the tasks in order: against finite differences, and against
    // the gradient of the same attention run one image at a time (summed here).
    let qkv9 = randn(&[9, s, 3 * d]);
    check_grad("fused attention (shared bias, 9 images)", &bias1, &|b| {
        Ok(fused::attention(&qkv9, Some(b), heads, scale)?.unwrap())
    });
    let r9 = randn(&[9, s, d]);
    let bias_grad = |images: &[usize]| {
        let b = Var::from_tensor(&bias1).unwrap();
        let mut total: Option<Tensor> = None;
        for &i in images {
            let x = qkv9.narrow(0, i, 1).unwrap();
            let y = fused::attention(&x, Some(b.as_tensor()), heads, scale)
                .unwrap()
                .unwrap();
            let loss = (y * r9.narrow(0, i, 1).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            let g = loss.backward().unwrap().get(b.as_tensor()).unwrap().clone();
            total = Some(match total {
                Some(t) => (t + g).unwrap(),
                None => g,
            });
        }
        total.unwrap()
    };
    let one_at_a_time = bias_grad(&(0..9).collect::<Vec<_>>());
    let b = Var::from_tensor(&bias1).unwrap();
    let y = fused::attention(&qkv9, Some(b.as_tensor()), heads, scale)
        .unwrap()
        .unwrap();
    let loss = (y * &r9).unwrap().sum_all().unwrap();
    let batched = loss.backward().unwrap().get(b.as_tensor()).unwrap().clone();
    assert_eq!(batched.dims(), bias1.dims());
    assert!(
        max_diff(&batched, &one_at_a_time) < 1e-12,
        "shared bias gradient over 9 images"
    );
}

/// LayerNorm's f32 backward (the vectorised kernel) against the f64 one, on row lengths with
/// and without whole 16-lane chunks and more rows than one parallel block (256): dx, dw, db
/// within f32 rounding of the f64 values.
#[test]
fn layer_norm_f32_gradients_match_f64() {
    let dev = Device::Cpu;
    for &(rows, d) in &[(3, 9), (300, 40), (520, 384)] {
        let x64 = Tensor::randn(0f64, 1.0, (rows, d), &dev)
            .unwrap()
            .affine(3.0, 0.5)
            .unwrap();
        let w64 = Tensor::randn(1f64, 0.3, d, &dev).unwrap();
        let b64 = Tensor::randn(0f64, 0.3, d, &dev).unwrap();
        let r64 = Tensor::randn(0f64, 1.0, (rows, d), &dev).unwrap();
        let grads = |dt: DType| {
            let x = Var::from_tensor(&x64.to_dtype(dt).unwrap()).unwrap();
            let w = Var::from_tensor(&w64.to_dtype(dt).unwrap()).unwrap();
            let b = Var::from_tensor(&b64.to_dtype(dt).unwrap()).unwrap();
            let y = ops::layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-6).unwrap();
            let r = r64.to_dtype(dt).unwrap();
            let g = (y * r).unwrap().sum_all().unwrap().backward().unwrap();
            [&x, &w, &b].map(|v| g.get(v.as_tensor()).unwrap().to_dtype(DType::F64).unwrap())
        };
        let (got, want) = (grads(DType::F32), grads(DType::F64));
        for (name, (a, e)) in ["dx", "dw", "db"].iter().zip(got.iter().zip(&want)) {
            let scale = common::max_abs(e);
            let d_ = max_diff(a, e);
            assert!(
                d_ <= 2e-5 * (1.0 + scale),
                "{rows}x{d} {name}: f32 vs f64 {d_} (values up to {scale})"
            );
        }
    }
}

/// The CPU gather of the relative position bias (`ops::fused::gather_columns`) against candle's
/// `index_select`, which it replaces: the same values, the same table gradient (summed in the
/// same order: equal bits in f32), on a real window's index where each table entry is
/// gathered many times; finite differences in f64; an index past the table is an error.
#[test]
fn gather_columns_matches_index_select_and_finite_differences() {
    use std::sync::Arc;
    let index = beit::model::relative_position::relative_position_index((5, 4));
    let cols = 9 * 7 + 3;
    let table = Tensor::randn(0f32, 1.0, (3, cols), &Device::Cpu).unwrap();
    let var = Var::from_tensor(&table).unwrap();
    let ix = Tensor::from_slice(index.as_slice(), index.len(), &Device::Cpu).unwrap();
    let r = Tensor::randn(0f32, 1.0, (3, index.len()), &Device::Cpu).unwrap();
    let run = |ours: bool| {
        let y = if ours {
            ops::fused::gather_columns(var.as_tensor(), &index).unwrap()
        } else {
            var.as_tensor().index_select(&ix, 1).unwrap()
        };
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        (y, g.get(var.as_tensor()).unwrap().clone())
    };
    let ((y, g), (y_ref, g_ref)) = (run(true), run(false));
    assert_eq!(y.dims(), &[3, 21 * 21]);
    assert_eq!(max_diff(&y, &y_ref), 0.0, "gathered values");
    assert_eq!(max_diff(&g, &g_ref), 0.0, "table gradient");
    // Every entry is reached (a scatter that dropped positions would leave some at zero).
    let counts = index.iter().fold(vec![0; cols], |mut c, &i| {
        c[i as usize] += 1;
        c
    });
    assert!(counts.iter().all(|&c| c > 0));
    check_grad("gather_columns", &randn(&[3, cols]), &|t| {
        ops::fused::gather_columns(t, &index)
    });
    // An empty index: an empty bias, and a zero gradient of the table's shape.
    let none = ops::fused::gather_columns(var.as_tensor(), &Arc::new(Vec::new())).unwrap();
    assert_eq!(none.dims(), &[3, 0]);
    let g = none.sum_all().unwrap().backward().unwrap();
    let g = g.get(var.as_tensor()).unwrap();
    assert_eq!(g.dims(), &[3, cols]);
    assert_eq!(max_diff(g, &g.zeros_like().unwrap()), 0.0);
    let bad = Arc::new(vec![0u32, cols as u32]);
    let e = ops::fused::gather_columns(&table, &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("out of range"), "{e}");
}
