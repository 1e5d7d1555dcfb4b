"""splitrpc: privacy-preserving split learning across hospitals over torch.distributed.rpc."""

__version__ = "0.1.0"
