//! A frozen model's linear layers keep only the weights packed for their CPU kernels (f32
//! panels, bf16, int8). The paths that do not run those kernels (the generic ops, switched on
//! after loading) read the packed copy back: f32 exactly, bf16 / int8 as the kernels use them.
//! Own test binary: the generic-ops switch and the matmul precision are process-wide.

mod common;

use beit::auto::AutoModel;
use beit::model::ForwardOptions;
use beit::ops::packed::{set_f32_matmul_precision, MatmulPrecision};
use beit::util::load_safetensors;
use candle_core::{DType, Device, Tensor};
use common::max_abs;

fn logits(model: &AutoModel, pixels: &Tensor) -> Tensor {
    let out = model.forward(pixels, &ForwardOptions::default()).unwrap();
    out.tensors["logits"].clone()
}

#[test]
fn generic_ops_read_the_packed_weights_back() {
    let dir = common::fixtures_root().join("cls_perlayer_larger");
    let model_dir = dir.join("../cls_perlayer_mean_ce");
    let inputs = load_safetensors(&dir.join("inputs.safetensors"), &Device::Cpu).unwrap();
    let expected = load_safetensors(&dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let (pixels, want) = (&inputs["pixel_values"], &expected["logits"]);
    let scale = max_abs(want);
    // (precision, largest |generic - kernels|, largest |generic - transformers|), relative to
    // the logits' largest magnitude.
    for (precision, to_kernels, to_reference) in [
        (MatmulPrecision::Highest, 1e-5, 1e-5),
        (MatmulPrecision::Bf16, 0.02, 0.02),
        (MatmulPrecision::Int8, 0.05, 0.05),
    ] {
        if !precision.available() {
            eprintln!("SKIPPED: no {} kernel on this CPU", precision.name());
            continue;
        }
        beit::ops::set_generic_only(false);
        set_f32_matmul_precision(precision);
        let (model, _) = AutoModel::from_pretrained(&model_dir, DType::F32, &Device::Cpu).unwrap();
        let kernels = logits(&model, pixels);
        beit::ops::set_generic_only(true);
        let generic = logits(&model, pixels);
        let d_kernels = max_abs(&(&generic - &kernels).unwrap()) / scale;
        let d_reference = max_abs(&(&generic - want).unwrap()) / scale;
        eprintln!(
            "{}: generic ops vs kernels {d_kernels:.2e}, vs transformers {d_reference:.2e}",
            precision.name()
        );
        assert!(d_kernels <= to_kernels, "{}: {d_kernels}", precision.name());
        assert!(
            d_reference <= to_reference,
            "{}: {d_reference}",
            precision.name()
        );
    }
    beit::ops::set_generic_only(false);
}
