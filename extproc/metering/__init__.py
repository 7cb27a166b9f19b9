"""Hot-path metering: SSE framing, usage, estimates and the response meter. Pure, no I/O.

API-independent: what each API's JSON looks like is in extproc.apis (one `ApiSchema` per API),
which the modules here are driven by. Import from the modules themselves
(extproc.metering.meter.ResponseMeter, extproc.metering.usage.Usage, ...): this package imports
nothing, so that importing a leaf module (extproc.metering.usage, which extproc.apis depends on)
does not import the modules that depend on extproc.apis.
"""
