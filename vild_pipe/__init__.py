"""vild-pipe: open-vocabulary detection (ViLD) as an offline pipeline of resumable, cached stages."""

__version__ = "0.1.0"
