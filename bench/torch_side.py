"""The reference side: diffusers' PyTorch modules and pipeline on the same folder, same shapes."""
import numpy as np

from bench import common


class Case:
    def __init__(self, fn):
        import torch
        self.fn, self.flops, self.compile_s, self.xla_bytes = fn, None, None, None
        self.torch = torch

    def run(self):
        with self.torch.inference_mode():
            self.fn()
        if self.torch.cuda.is_available():
            self.torch.cuda.synchronize()


class Torch:
    name = "torch"

    def __init__(self, folder, dtype):
        import torch
        from tests.torchvision_ops import torchvision_without_ops
        torchvision_without_ops()  # before diffusers imports it
        import diffusers
        self.torch = torch
        self.dtype = getattr(torch, dtype)
        self.pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            folder, safety_checker=None, requires_safety_checker=False, torch_dtype=self.dtype)
        self.pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"  # SDPA attention on either
        self.pipe.to(self.device)

    def _tensor(self, a):
        """NHWC numpy -> NCHW tensor in the pipeline's dtype."""
        return self.torch.from_numpy(a).permute(0, 3, 1, 2).contiguous().to(self.device, self.dtype)

    def text_encode(self, spec):
        tok = self.pipe.tokenizer([common.PROMPT, ""], padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt")
        return Case(lambda: self.pipe.text_encoder(tok.input_ids.to(self.device))[0])

    def unet_cfg(self, spec):
        unet, g = self.pipe.unet, common.GUIDANCE
        x = self._tensor(common.latents(spec, unet.config.in_channels, self.pipe.vae_scale_factor))
        ctx = self.torch.zeros((2, 77, self.pipe.text_encoder.config.hidden_size), dtype=self.dtype,
                               device=self.device)
        t = self.torch.tensor(500, device=self.device)

        def fn():
            uncond, cond = unet(self.torch.cat([x, x]), t, ctx).sample.chunk(2)
            return uncond + g * (cond - uncond)
        return Case(fn)

    def vae_decode(self, spec):
        z = self._tensor(common.latents(spec, self.pipe.vae.config.latent_channels, self.pipe.vae_scale_factor))
        return Case(lambda: self.pipe.vae.decode(z).sample)

    def sample(self, spec):
        prompts = [common.PROMPT] * spec.get("batch", 1)
        return Case(lambda: self.pipe(prompts, num_inference_steps=spec["steps"], guidance_scale=common.GUIDANCE,
                                      height=spec["size"], width=spec["size"], output_type="np"))

    def train_step(self, spec):
        """fp32 master weights; bf16 runs the forward/backward under autocast (the usual mixed precision)."""
        torch, b = self.torch, spec["batch"]
        unet = self.pipe.unet.float().train()
        opt = torch.optim.AdamW(unet.parameters(), lr=common.ADAMW["learning_rate"],
                                betas=(common.ADAMW["b1"], common.ADAMW["b2"]), eps=common.ADAMW["eps"],
                                weight_decay=common.ADAMW["weight_decay"])
        x = torch.from_numpy(common.latents(spec, unet.config.in_channels, self.pipe.vae_scale_factor, b))
        x = x.permute(0, 3, 1, 2).contiguous().to(self.device)
        ctx = torch.from_numpy(np.random.default_rng(1).standard_normal(
            (b, 77, self.pipe.text_encoder.config.hidden_size), np.float32)).to(self.device)
        t = torch.full((b,), 500, device=self.device)
        device = self.device
        bf16 = self.dtype == torch.bfloat16

        class Step(Case):
            def run(self):
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                    out = unet(x, t, ctx).sample
                torch.nn.functional.mse_loss(out.float(), x).backward()
                opt.step()
                if device == "cuda":
                    torch.cuda.synchronize()
        return Step(None)
