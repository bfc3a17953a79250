"""The usual Python serving stack for the same model, as the comparison peer of `beit serve`:
a transformers image-classification pipeline behind a small FastAPI app on uvicorn.

    python scripts/serve_python.py MODEL_DIR --port 8090 [--threads N]

`POST /predict` takes the image bytes as the body (as `beit serve` does) and answers
`[{"label", "score"}]`; the request id header is echoed so `beit bench-server` can check answers.
One worker process (as many people run it); torch uses --threads threads (default: all cores).
"""

import argparse
import io
import os

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from transformers import pipeline

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("--port", type=int, default=8090)
parser.add_argument("--threads", type=int, default=os.cpu_count())
parser.add_argument("--top-k", type=int, default=5)
args = parser.parse_args()

torch.set_num_threads(args.threads)
classifier = pipeline("image-classification", model=args.model, device="cpu")
app = FastAPI()


@app.get("/health")
def health():
    return {"ready": True}


@app.post("/predict")
async def predict(request: Request):
    body = await request.body()
    try:
        image = Image.open(io.BytesIO(body)).convert("RGB")
    except Exception as e:  # not an image
        return JSONResponse({"error": str(e)}, status_code=422)
    # The pipeline runs torch synchronously: one request at a time, as a plain app does.
    with torch.inference_mode():
        out = classifier(image, top_k=args.top_k)
    rid = request.headers.get("x-request-id", "")
    return JSONResponse(out, headers={"x-request-id": rid, "x-batch-size": "1"})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
