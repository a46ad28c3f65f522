-- Chaperone collector: which configured cluster each observer's progress arrives through.
--
-- An observer is judged stale when it has been silent for `reconcile.instance_timeout`. Silence
-- only counts while the collector can hear the cluster whose audit topic the observer reports
-- to: when that cluster is unreachable (a broker killed, a network partition), every observer
-- reporting through it is silent together, which is delay, not a stopped producer or tier.
-- `source` is the alias (`[[clusters]] alias`) of the cluster the latest progress record was
-- read from; NULL for rows written before this column existed or by tools that do not say.
ALTER TABLE audit_progress ADD COLUMN source text;
