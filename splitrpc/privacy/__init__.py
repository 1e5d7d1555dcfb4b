"""What the server can learn about hospital images and labels from what it receives.

Split learning keeps raw images at the hospitals, but the server sees the head's
activations (and, U-shaped, the loss gradients), and an activation one
convolution away from the image can carry most of it. One module per topic:

* ``splitrpc.privacy.dcor``: distance correlation between images and
  activations (Székely, Rizzo & Bakirov, 2007), the quantity NoPeek
  (Vepakomma et al., 2019) penalises, and its bias-corrected form (Székely &
  Rizzo, 2013);
* ``splitrpc.privacy.image_metrics``: ``denormalize`` back to pixel scale, PSNR
  and SSIM to score reconstructions;
* ``splitrpc.privacy.inversion``: reconstruction attacks (the query-free
  model-inversion attack of He, Zhang & Lee, ACSAC 2019, and white-box
  inversion, "rMLE") and ``leakage_report``, which scores one batch with all of
  the above;
* ``splitrpc.privacy.label_leakage``: label inference from the gradients a
  U-shaped server receives (Li et al., ICLR 2022), and the hospital's defences.

Images here are normalised float tensors (N, 3, H, W) as produced by
``splitrpc.data``. Importers name the submodule they use.
"""
