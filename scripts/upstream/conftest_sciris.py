"""pytest plugin: run sciris' own tests with ``sc.parallelize`` replaced by shoal's adapter."""

import sciris as sc

from shoal.compat.sciris import parallelize

sc.parallelize = parallelize
sc.sc_parallel.parallelize = parallelize
