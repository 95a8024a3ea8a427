"""Training losses of UniTok, apart from the model: reconstruction, perceptual, adversarial
(discriminators, DiffAug, adaptive weight) and the CLIP contrastive loss. Each module is
parameter-free or owns only its own network; weights live in the training config."""
from .adversarial import (DiffAug, DinoDiscriminator, PatchGANDiscriminator, adaptive_generator_weight,
                          build_discriminator, discriminator_hinge_loss, generator_hinge_loss)
from .contrastive import ContrastiveLoss
from .perceptual import EffNetPerceptual, LPIPSPerceptual, build_perceptual
from .reconstruction import reconstruction_losses

__all__ = ['reconstruction_losses', 'build_perceptual', 'EffNetPerceptual', 'LPIPSPerceptual', 'DiffAug',
           'DinoDiscriminator', 'PatchGANDiscriminator', 'build_discriminator', 'adaptive_generator_weight',
           'discriminator_hinge_loss', 'generator_hinge_loss', 'ContrastiveLoss']
