"""Engines that run Ragline's own pipeline steps on a cluster (`engine: ray`); nothing outside imports this
package except where `engine` chooses it."""
