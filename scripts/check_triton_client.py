"""An unchanged Triton client against `beit serve`: tritonclient.http (pip install
"tritonclient[http]") runs the v2 protocol on a parity fixture, with binary tensors (its
default) and with JSON, and the logits must be transformers' (the fixture's expected values).

    beit serve --model cls=tests/fixtures/models/cls_abs_clspool_bce --port 8080 &
    python scripts/check_triton_client.py localhost:8080 cls tests/fixtures/models/cls_abs_clspool_bce
"""

import sys

import numpy as np
import tritonclient.http as httpclient
from safetensors.numpy import load_file

url, model, fixture = sys.argv[1:4]
inputs = load_file(f"{fixture}/inputs.safetensors")
expected = load_file(f"{fixture}/expected.safetensors")["logits"]
client = httpclient.InferenceServerClient(url)
assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(model)
meta = client.get_model_metadata(model)
print("metadata:", meta["inputs"][0], meta["outputs"])
pv = inputs["pixel_values"].astype(np.float32)
worst = 0.0
for binary in (True, False):
    x = httpclient.InferInput("pixel_values", list(pv.shape), "FP32")
    x.set_data_from_numpy(pv, binary_data=binary)
    out = httpclient.InferRequestedOutput("logits", binary_data=binary)
    result = client.infer(model, [x], outputs=[out], request_id="check-1")
    logits = result.as_numpy("logits")
    diff = float(np.abs(logits - expected).max())
    worst = max(worst, diff)
    print(f"binary_data={binary}: logits {logits.shape}, max |diff| vs transformers {diff:.2e}")
assert worst < 1e-4, worst
print("ok")
