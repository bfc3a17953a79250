"""Write a BEiT-base image classifier with random weights (the `cls-224` workload of
`beit bench`: relative position bias, mean pooling, layer scale 0.1, 1000 labels) and its image
processor, for serving benchmarks: `python scripts/make_bench_model.py OUT_DIR`."""

import sys

import torch
from transformers import BeitConfig, BeitForImageClassification, BeitImageProcessor

out = sys.argv[1]
torch.manual_seed(0)
config = BeitConfig(
    image_size=224,
    use_relative_position_bias=True,
    use_mean_pooling=True,
    layer_scale_init_value=0.1,
    num_labels=1000,
    drop_path_rate=0.0,
    architectures=["BeitForImageClassification"],
)
model = BeitForImageClassification(config).eval()
model.save_pretrained(out)
BeitImageProcessor(
    size={"height": 224, "width": 224}, do_center_crop=False, resample=2
).save_pretrained(out)
print(out)
