"""Stand-ins for the evaluation tests (test_fid.py, test_clip_score.py, test_eval_run.py): pytorch-fid's Inception
with random weights, and a tiny random transformers CLIPModel folder."""
import torch

from conftest import _randomize

TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)

# pytorch-fid's FID blocks, swapped into torchvision's Inception3 as its fid_inception_v3 does
FID_BLOCKS = (("Mixed_5b", "FIDInceptionA", (192, 32)), ("Mixed_5c", "FIDInceptionA", (256, 64)),
              ("Mixed_5d", "FIDInceptionA", (288, 64)), ("Mixed_6b", "FIDInceptionC", (768, 128)),
              ("Mixed_6c", "FIDInceptionC", (768, 160)), ("Mixed_6d", "FIDInceptionC", (768, 160)),
              ("Mixed_6e", "FIDInceptionC", (768, 192)), ("Mixed_7b", "FIDInceptionE_1", (1280,)),
              ("Mixed_7c", "FIDInceptionE_2", (2048,)))


def random_fid_inception(seed=0):
    """pytorch-fid's fid_inception_v3 module tree, random: He-scaled convolutions and BatchNorms near identity,
    so that features stay O(1) through the 94 layers; every BatchNorm statistic random."""
    from pytorch_fid import inception
    net = inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for name, block, args in FID_BLOCKS:
        setattr(net, name, getattr(inception, block)(*args))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("conv.weight"):
                t.copy_(noise * (2 / t[0].numel()) ** 0.5)
            elif name.endswith("running_var"):
                t.copy_(1 + 0.5 * noise.abs())
            elif name.endswith("bn.weight"):
                t.copy_(1 + 0.1 * noise)
            else:  # BatchNorm's bias and running mean; the classifier
                t.copy_(0.1 * noise)
    return net.eval()


def write_fid_inception(path, seed=0):
    """random_fid_inception(seed)'s state dict saved at `path`, as pytorch-fid's weight file is."""
    torch.save(random_fid_inception(seed).state_dict(), path)
    return str(path)


def build_clip_folder(folder, tokenizer):
    """A tiny random transformers CLIPModel with its CLIPProcessor saved in `folder` (torchmetrics 1.9 loads a local
    folder only when its path holds "openai")."""
    import transformers
    config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)
    model = _randomize(transformers.CLIPModel(config), 3)
    with torch.no_grad():  # its random towers agree on a direction: flipped, the pairs score above 0
        model.text_projection.weight.neg_()
    model.save_pretrained(folder)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                      crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


