//! Loss functions with transformers' semantics (all differentiable).

use candle_core::{DType, Result, Tensor, D};

/// Losses are computed in f32 for reduced-precision logits, else in the logits' dtype.
fn upcast(t: &Tensor) -> Result<Tensor> {
    match t.dtype() {
        DType::F16 | DType::BF16 => t.to_dtype(DType::F32),
        _ => Ok(t.clone()),
    }
}

/// `nn.CrossEntropyLoss(ignore_index=...)` with mean reduction over the non-ignored targets.
/// `logits [N, C]`, `labels [N]` (integer).
pub fn cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    ignore_index: Option<i64>,
) -> Result<Tensor> {
    let (n, c) = logits.dims2()?;
    let logits = upcast(logits)?;
    let labels = labels.to_dtype(DType::I64)?.flatten_all()?;
    if labels.dim(0)? != n {
        candle_core::bail!("labels: expected {n} targets, got {}", labels.dim(0)?);
    }
    let valid = match ignore_index {
        Some(ig) => labels.ne(ig)?,
        None => labels.ones_like()?.to_dtype(DType::U8)?,
    };
    // Out-of-range labels that are not ignored are an error, as in PyTorch.
    let checked = valid.where_cond(&labels, &labels.zeros_like()?)?;
    let (lo, hi) = (
        checked.min(0)?.to_scalar::<i64>()?,
        checked.max(0)?.to_scalar::<i64>()?,
    );
    if lo < 0 || hi >= c as i64 {
        candle_core::bail!(
            "labels: target {} is out of range for {c} classes",
            if lo < 0 { lo } else { hi }
        );
    }
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = log_probs.gather(&checked.unsqueeze(1)?, 1)?.squeeze(1)?;
    let w = valid.to_dtype(logits.dtype())?;
    let count = w.sum_all()?;
    let total = (picked * &w)?.sum_all()?.neg()?;
    // PyTorch returns NaN when every target is ignored (0/0); keep that behaviour.
    total.div(&count)
}

/// `nn.BCEWithLogitsLoss()` (mean), numerically stable form.
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let x = upcast(logits)?;
    let y = targets.to_dtype(x.dtype())?;
    if x.shape() != y.shape() {
        candle_core::bail!(
            "labels: shape {:?} does not match logits {:?}",
            y.shape(),
            x.shape()
        );
    }
    // max(x, 0) - x*y + log(1 + exp(-|x|))
    let loss = ((x.relu()? - (&x * &y)?)? + x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?)?;
    loss.mean_all()
}

/// `nn.MSELoss()` (mean).
pub fn mse(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    let p = upcast(pred)?;
    let t = target.to_dtype(p.dtype())?;
    if p.elem_count() != t.elem_count() {
        candle_core::bail!(
            "labels: {} values for {} predictions",
            t.elem_count(),
            p.elem_count()
        );
    }
    (p.flatten_all()? - t.flatten_all()?)?.sqr()?.mean_all()
}
