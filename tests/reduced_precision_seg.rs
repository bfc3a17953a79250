//! Segmentation under `--matmul-precision bf16` on an AMX CPU: the UperNet convolutions run on
//! AMX tiles too (`ops::conv2d_amx_inference`), and the logits stay within bf16's error of
//! transformers' f32 ones. Own test binary: the precision is process-wide.

mod common;

use std::collections::HashMap;

use beit::ops::packed::{set_f32_matmul_precision, MatmulPrecision};
use beit::tasks::forward::{forward_file, ForwardArgs};
use beit::util::load_safetensors;
use candle_core::{DType, Device, Tensor};
use common::max_abs;

#[test]
fn segmentation_in_bf16_runs_the_convolutions_on_amx_and_stays_close() {
    if !beit::ops::amx::native(beit::ops::amx::AmxKind::Bf16) {
        eprintln!("SKIPPED: this CPU/OS has no AMX bf16; the AMX convolutions were not tested");
        return;
    }
    set_f32_matmul_precision(MatmulPrecision::Bf16);
    for case in ["seg_aux", "seg_aux_nonsquare", "seg_noaux"] {
        let dir = common::fixtures_root().join(case);
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("case.json")).unwrap()).unwrap();
        let model = dir.join(meta["model"].as_str().unwrap());
        let before = beit::ops::amx_conv_count();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out.safetensors");
        let args = ForwardArgs {
            output_hidden_states: false,
            output_attentions: false,
            interpolate_pos_encoding: false,
            target_sizes: None,
            dtype: DType::F32,
        };
        forward_file(
            &model,
            &dir.join("inputs.safetensors"),
            &out,
            &args,
            &Device::Cpu,
        )
        .unwrap();
        assert!(
            beit::ops::amx_conv_count() > before,
            "{case}: no convolution ran on AMX"
        );
        let got: HashMap<String, Tensor> = load_safetensors(&out, &Device::Cpu).unwrap();
        let want = load_safetensors(&dir.join("expected.safetensors"), &Device::Cpu).unwrap();
        let (g, w) = (&got["logits"], &want["logits"]);
        let (scale, d) = (max_abs(w), max_abs(&(g - w).unwrap()));
        eprintln!("{case}: max |bf16 - transformers f32| {d:.2e} for logits up to {scale:.2e}");
        assert!(d <= 2e-2 * scale, "{case}: {d} for logits up to {scale}");
        assert!(d > 0.0, "{case}: identical to f32 (bf16 did not run)");
    }
}
