"""maskfleet.gateway: the HTTP API in front of the fleet (`maskfleet gateway`), for producers in any language.

Stateless: every replica talks to the same Redis through the producer's client, so any
number of them can stand behind a load balancer. It imports no torch and no sampling code.
"""
