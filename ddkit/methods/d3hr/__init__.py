"""D^3HR: DDIM inversion, per-class Gaussian statistics and representative group sampling.

Zhao et al., "Taming Diffusion for Dataset Distillation with High Representativeness" (ICML 2025),
reference code lin-zhao-resoLve/D3HR: ``generation/dit_inversion_save_statistic.py`` (inversion +
statistics) and ``generation/group_sampling.py`` (group sampling + decoding).

Pipeline (one class k at a time):

1. **DDIM inversion** of every real training image's latent z_0 (VAE latent ×0.18215 for latent models,
   the [-1, 1] image for pixel models) with the class label and CFG scale 4.0, using diffusers'
   :class:`~diffusers.DDIMInverseScheduler` on DiT's schedule (:func:`ddkit.schedule.scheduler_config`):
   50 steps, stride 20, timesteps 20, 40, …, 760. Each step maps x_{t-20} -> x_t with ε queried at the
   *destination* timestep t, exactly as the reference's ``invert`` (it skips the scheduler's first
   timestep 0, and so do we; diffusers' ``DDIMInverseScheduler.step`` then computes the reference's
   update, ᾱ_{t-20} -> ᾱ_t with ᾱ_0 = 0.9999 for the clean latent; ``tests/test_d3hr.py`` checks it
   against the reference formula written out). The reference stops after
   t = 760 (it skips its last 11 iterations) and keeps the latents for t = 480, 500, …, 760; so do we
   (``store_from``/``store_to``).
2. **Per-class diagonal Gaussian**: mean and unbiased variance over the class's inverted latents, for every
   stored timestep, accumulated in float64 (Chan et al.'s pairwise update, so batching does not change the
   result beyond rounding) and kept as float32. The reference runs the pipeline in float16 and fits with
   ``torch.mean``/``torch.var`` (unbiased); we run inversion and the fit in float32 or better.
   Statistics are cached on disk under a sha256 of everything they depend on (model weights, VAE weights,
   training shard sha256s, schedule, inversion settings, class mapping) and reused.
3. **Group sampling** (D^3HR paper, group sampling; reference ``select_algorithm_batch`` and
   ``evaluate_distribution_batch``):
   draw m candidate groups of IPC latents from N(μ_k, σ_k²) at ``timestep`` (default 600, the reference's
   ``i_step = 6``) and keep the group minimising
   λ_μ‖mean_g − μ‖₂ + λ_σ‖std_g − σ‖₂ + λ_γ‖skew_g‖₂.
   Defaults are the reference code's λ = (1, 1, 0.1) (``evaluate_distribution_batch``; its unused
   single-group ``evaluate_distribution`` has λ_γ = 10). The paper writes the same three terms with
   weights λ_μ, λ_σ, λ_γ; we could not retrieve its stated numeric values in this environment, so the
   reference code's values are the defaults — set ``generate.d3hr.lambda_*`` to the paper's if they differ.
   ``num_groups`` is a real count m. The reference's ``--m 100000`` runs ``m // 10 = 10,000`` batches of
   10,000 groups, i.e. 10^8 groups per class (:data:`REFERENCE_NUM_GROUPS`); the default m = 10,000 is one
   reference batch, and any m up to 10^8 can be set (``generate.d3hr.num_groups``). The search runs inside
   the generation budget; :func:`select_latents` returns its seconds per class, which ``ddkit generate``
   prints and records, and :func:`group_search_seconds` estimates it for any m from one timed chunk.
4. **Decoding** by DDIM from the stored timestep with CFG 4.0, then VAE decoding for latent models (done by
   :mod:`ddkit.sampling`/:mod:`ddkit.generate`; :func:`ddim_denoise` here runs that same sampler on the
   50-step grid, for tests and the benchmark). The reference keeps the latent stored at t = 600 but restarts its 50-step DDIM
   sampler at ``start_step = 18``, i.e. timestep 980 − 18·20 = 620 (:func:`start_timestep`): the stored
   x_600 is treated as x_620 (ᾱ_600 = 0.0256 vs ᾱ_620 = 0.0200) and ε is first queried at 620. The exact
   DDIM inverse would restart at 600 (``restart_strides = 0``). We keep the reference's one-stride shift
   because it is what produced the paper's numbers: the first x0-prediction divides by √ᾱ_620 = 0.141
   instead of √ᾱ_600 = 0.160, scaling it up by about 13%, and the sampler gets one more denoising step —
   a mild sharpening, not an exact reconstruction (``tests/test_d3hr.py`` measures both round trips).
   The reference decodes on its 50-step grid, 620, 600, …, 0 (32 steps, :func:`decode_grid`); ``ddkit
   generate`` caps the planner's steps at that count (:func:`decode_settings`), so the chain is exactly the
   reference's whenever the budget allows 32 steps, and a coarser spacing of [0, 620] when it does not.
   CFG covers all latent channels (the reference's ``sample`` guides ``noise_pred[:, :latent_channels]``),
   whatever ``generate.guided_channels`` says for the other methods.
5. **Saving**: the reference saves each 256 px decoded image resized to 224 with PIL LANCZOS
   (``group_sampling.py``: ``numpy_to_pil(image)[0].resize((224, 224), Image.LANCZOS)``); see
   :func:`reference_save_resize`. Real images enter inversion through ``Resize(256)`` + ``CenterCrop(256)``
   (``dit_inversion_save_statistic.py`` ``get_transforms``); see :func:`reference_input_resize`.

Modules, in the order of the data flow:

* :mod:`~ddkit.methods.d3hr.inversion`: the DDIM grid (stride, stored and restart timesteps) and DDIM
  inversion (step 1);
* :mod:`~ddkit.methods.d3hr.statistics`: the per-class Gaussians, their cache key and cache (step 2);
* :mod:`~ddkit.methods.d3hr.groups`: skewness, group scores and the representative group (step 3);
* :mod:`~ddkit.methods.d3hr.decode`: the decoding grid and settings, :func:`ddim_denoise`, and the reference's
  input and save resizes (steps 4 and 5).

Every public name is re-exported here: ``from ddkit.methods import d3hr; d3hr.class_statistics(...)``.
"""

from ddkit.methods.d3hr.decode import (
    GUIDED_CHANNELS,
    SAVE_SIZE,
    ddim_denoise,
    decode_grid,
    decode_settings,
    reference_input_resize,
    reference_save_resize,
)
from ddkit.methods.d3hr.groups import (
    REFERENCE_NUM_GROUPS,
    group_scores,
    group_search_seconds,
    group_seed,
    group_skewness,
    initial_latents,
    select_group,
    select_latents,
)
from ddkit.methods.d3hr.inversion import ddim_invert, guided_eps, start_timestep, stored_timesteps, stride
from ddkit.methods.d3hr.statistics import (
    CACHE_VERSION,
    D3HRStats,
    backbone_labels,
    class_statistics,
    precompute_statistics,
    statistics_inputs,
    statistics_key,
    tensor_digest,
)

__all__ = [
    "CACHE_VERSION",
    "D3HRStats",
    "GUIDED_CHANNELS",
    "REFERENCE_NUM_GROUPS",
    "SAVE_SIZE",
    "backbone_labels",
    "class_statistics",
    "precompute_statistics",
    "ddim_denoise",
    "ddim_invert",
    "decode_grid",
    "decode_settings",
    "group_scores",
    "group_search_seconds",
    "group_seed",
    "group_skewness",
    "guided_eps",
    "initial_latents",
    "reference_input_resize",
    "reference_save_resize",
    "select_group",
    "select_latents",
    "start_timestep",
    "statistics_inputs",
    "statistics_key",
    "stored_timesteps",
    "stride",
    "tensor_digest",
]
