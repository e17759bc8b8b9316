-- The funnel: rows at each stage, with the drop reasons, in data-flow order.
SELECT step, reason, rows FROM funnel
ORDER BY position, step, rows DESC, reason
