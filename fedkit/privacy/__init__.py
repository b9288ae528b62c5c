"""Privacy: homomorphic encryption of model updates (`fedkit.privacy.he`, CKKS with TenSEAL).

Privacy is composed, not inherited: each technique is a set of filters and small functions that a
workflow switches on, e.g. ``FedAvg(rounds=20, he=he.CKKS())``. TenSEAL is imported only when a run
uses it, so ``import fedkit`` works without it.
"""
