"""unified_lm: the joint text+image vocabulary and the Chameleon-style decoder-only transformer.

Not built yet (see the project's issues): this package reads vqtok's token store through
`vqtok.TokenStore` and never the other way round.
"""
