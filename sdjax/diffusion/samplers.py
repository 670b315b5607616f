"""The sampler registry: name -> Sampler, the diffusers scheduler class each reproduces, and `configure`,
which turns a model's scheduler_config.json into a sampler's settings and plan options as diffusers would."""
import functools
import inspect
import logging

from sdjax.diffusion import schedules
from sdjax.diffusion.consistency_samplers import CONSISTENCY_SAMPLERS
from sdjax.diffusion.dpm_solver import DPM_SAMPLERS
from sdjax.diffusion.k_samplers import K_SAMPLERS
from sdjax.diffusion.midpoint_samplers import MIDPOINT_SAMPLERS
from sdjax.diffusion.multistep_samplers import MULTISTEP_SAMPLERS
from sdjax.diffusion.timestep_samplers import TIMESTEP_SAMPLERS

log = logging.getLogger("sdjax")

SAMPLERS = {**TIMESTEP_SAMPLERS, **K_SAMPLERS, **DPM_SAMPLERS, **MIDPOINT_SAMPLERS, **MULTISTEP_SAMPLERS,
            **CONSISTENCY_SAMPLERS}
# The diffusers scheduler class each sampler reproduces.
SCHEDULER_CLASSES = {
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler", "dpmpp_3m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde": "DPMSolverMultistepScheduler", "dpmpp_3m_sde": "DPMSolverMultistepScheduler",
    "dpmpp_2s": "DPMSolverSinglestepScheduler", "deis": "DEISMultistepScheduler",
    "dpm2": "KDPM2DiscreteScheduler", "dpm2_a": "KDPM2AncestralDiscreteScheduler",
    "dpmpp_sde": "DPMSolverSDEScheduler", "unipc": "UniPCMultistepScheduler", "lms": "LMSDiscreteScheduler",
    "lcm": "LCMScheduler", "tcd": "TCDScheduler",
}
# diffusers' defaults of each scheduler class where they differ from schedules.DEFAULTS: they apply to
# keys a model's scheduler_config.json leaves out (SD 1.5's has no timestep_spacing, for one).
CLASS_DEFAULTS = {
    "ddim": {"clip_sample": True}, "ddpm": {"clip_sample": True},
    "pndm": {"set_alpha_to_one": False, "skip_prk_steps": False},
    "euler": {"timestep_spacing": "linspace"}, "euler_a": {"timestep_spacing": "linspace"},
    "heun": {"timestep_spacing": "linspace", "beta_start": 0.00085, "beta_end": 0.012},
    **{name: {"timestep_spacing": "linspace"} for name in ("dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde",
                                                           "dpmpp_2s", "deis")},
    **{name: {"timestep_spacing": "linspace", "beta_start": 0.00085, "beta_end": 0.012}
       for name in ("dpm2", "dpm2_a", "dpmpp_sde")},
    "unipc": {"timestep_spacing": "linspace"}, "lms": {"timestep_spacing": "linspace"},
    "lcm": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"},
    "tcd": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"},
}
# Keys of each class that change its result and that the sampler implements at one value only (its
# class default unless noted). Keys a sampler's plan takes as options (use_karras_sigmas, ...) are honoured.
FIXED_KEYS = {
    "ddim": {"thresholding": False},
    "ddpm": {"thresholding": False, "variance_type": "fixed_small"},
    "pndm": {"skip_prk_steps": True},  # PLMS only (False, the class default, begins with Runge-Kutta steps)
    "euler": {"interpolation_type": "linear", "timestep_type": "discrete"},
    "euler_a": {},
    "heun": {},
    # the names fix algorithm_type and solver_order (dpmsolver / sde-dpmsolver, deprecated in diffusers, are not run)
    **{name: {"algorithm_type": algorithm, "solver_order": order, "thresholding": False, "variance_type": None,
              "use_flow_sigmas": False, "use_dynamic_shifting": False}
       for name, (algorithm, order) in {"dpmpp_2m": ("dpmsolver++", 2), "dpmpp_3m": ("dpmsolver++", 3),
                                        "dpmpp_2m_sde": ("sde-dpmsolver++", 2),
                                        "dpmpp_3m_sde": ("sde-dpmsolver++", 3)}.items()},
    "dpmpp_2s": {"algorithm_type": "dpmsolver++", "thresholding": False, "variance_type": None,
                 "use_flow_sigmas": False, "use_dynamic_shifting": False},
    "deis": {"thresholding": False, "use_flow_sigmas": False, "use_dynamic_shifting": False},
    "dpm2": {}, "dpm2_a": {},
    # Our Brownian noise comes from the images' keys (one path per image); a torchsde seed's bits are not reproduced.
    "dpmpp_sde": {"noise_sampler_seed": None},
    "unipc": {"thresholding": False, "solver_p": None, "use_flow_sigmas": False, "use_dynamic_shifting": False,
              "sigma_min": None, "sigma_max": None},
    "lms": {},
    "lcm": {"thresholding": False},
    "tcd": {},  # TCDScheduler.step reads neither clip_sample nor thresholding
}
# What diffusers' StableDiffusionPipeline sets on its own scheduler when the config is outdated.
_PIPELINE_FIXES = {"steps_offset": 1, "clip_sample": False}


@functools.lru_cache(maxsize=None)
def _warn_once(message):
    log.warning(message)


def plan_options(name):
    """The option names sampler `name`'s plan takes (configure's keyword arguments)."""
    return set(inspect.signature(SAMPLERS[name].plan).parameters) - {"settings", "num_steps"}


def configure(name, config, **options):
    """(settings, plan options) of sampler `name` for a model's scheduler_config.json, as diffusers runs
    `StableDiffusionPipeline.from_pretrained(folder)` with `pipe.scheduler = Class.from_config(pipe.scheduler.config)`.

    Keys the config leaves out take the class defaults; outdated steps_offset / clip_sample are updated as the
    pipeline does (on its own scheduler class also where the key is left out); config keys that are plan
    options are honoured unless given in `options`; other keys at a value the sampler does not implement
    give one warning each. Raises ValueError for options the sampler does not take.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(sorted(SAMPLERS))}")
    plan_keys = plan_options(name)
    unknown = sorted(set(options) - plan_keys)
    if unknown:
        raise ValueError(f"sampler {name!r} does not take options {unknown}; it takes {sorted(plan_keys) or 'none'}")
    native = config.get("_class_name") == SCHEDULER_CLASSES[name]
    config = {**config, **{k: v for k, v in _PIPELINE_FIXES.items() if k in config and config[k] != v}}
    settings = schedules.scheduler_settings(config, {**CLASS_DEFAULTS[name], **(_PIPELINE_FIXES if native else {})})
    effective = {**CLASS_DEFAULTS[name], **config}
    for key, value in FIXED_KEYS[name].items():
        if effective.get(key, value) != value:
            _warn_once(f"scheduler config {key}={effective[key]!r}{'' if key in config else ' (left out)'} is not "
                       f"implemented by sampler {name!r}, which runs {key}={value!r}: results differ from "
                       f"diffusers' {SCHEDULER_CLASSES[name]}")
    from_config = {k: config[k] for k in plan_keys if config.get(k) is not None}
    return settings, {**from_config, **options}


def _dpm_multistep(config):
    """The DPMSolverMultistepScheduler sampler of a config: by algorithm_type (sde or not) and solver_order (2 or 3)."""
    sde = str(config.get("algorithm_type", "dpmsolver++")).startswith("sde")
    return f"dpmpp_{3 if config.get('solver_order', 2) >= 3 else 2}m{'_sde' if sde else ''}"


# scheduler class -> (config -> sampler name), for classes that several samplers reproduce
SCHEDULER_CHOOSERS = {"DPMSolverMultistepScheduler": _dpm_multistep}


def scheduler_sampler(config):
    """(sampler name, plan options) that diffusers runs for a scheduler_config.json dict, by its `_class_name`;
    None for a class no sampler reproduces. Keys the sampler does not implement warn as in `configure`."""
    cls = config.get("_class_name")
    if cls in SCHEDULER_CHOOSERS:
        name = SCHEDULER_CHOOSERS[cls](config)
    else:
        name = next((n for n, c in SCHEDULER_CLASSES.items() if c == cls), None)
        if name is None:
            return None
    return name, configure(name, config)[1]
