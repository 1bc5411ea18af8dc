"""python -m aligndet.predict on torchvision's detectors: converted to ours, the same detections as theirs."""
import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from aligndet import predict


@pytest.fixture(scope="module")
def tv_file(tmp_path_factory):
    """A randomly initialised torchvision Faster R-CNN (COCO's 91 classes) saved as a state dict, as its
    release files are; and the model itself."""
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    path = tmp_path_factory.mktemp("tv") / "frcnn.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_a_torchvision_detector_predicts_what_torchvision_does(tv_file, tmp_path):
    path, tv_model = tv_file
    rng = np.random.default_rng(0)
    image = (rng.random((80, 96, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    out = tmp_path / "d.json"
    outputs = predict.main(["--torchvision", "fasterrcnn_resnet50_fpn", "--checkpoint", str(path), "--images",
                            str(tmp_path / "a.png"), "--out", str(out), "--score-threshold", "0", "--device", "cpu"])
    with torch.no_grad():
        theirs = tv_model([torch.from_numpy(image).permute(2, 0, 1).float() / 255])[0]
    ours = outputs[1]
    assert len(theirs["boxes"]) > 0 and torch.equal(ours["labels"], theirs["labels"])
    torch.testing.assert_close(ours["boxes"], theirs["boxes"], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours["scores"], theirs["scores"], atol=1e-5, rtol=0)
    results = json.load(open(out))
    assert len(results) == len(theirs["boxes"])  # torchvision's labels are COCO's category ids
    assert {r["category_id"] for r in results} == set(theirs["labels"].tolist())


def test_torchvision_options_are_checked(tv_file, tmp_path):
    path, _ = tv_file
    with pytest.raises(SystemExit, match="not a fasterrcnn_resnet50_fpn state dict with 5 classes"):
        predict.main(["--torchvision", "fasterrcnn_resnet50_fpn", "--checkpoint", str(path), "--num-classes", "5",
                      "--images", str(tmp_path)])
    with pytest.raises(SystemExit, match="must name a builder"):
        predict.main(["--torchvision", "resnet50", "--checkpoint", str(path), "--images", str(tmp_path)])
    _, names, label_to_cat = predict.load_torchvision_detector("fasterrcnn_resnet50_fpn", str(path))
    assert names[0] == "person" and len(names) == 90 and label_to_cat[90] == 90
