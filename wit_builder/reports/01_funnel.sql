-- The funnel: rows at each stage, with the drop reasons, in data-flow order.
SELECT step, reason, rows FROM (
  SELECT 1 AS stage, 'candidates' AS step, NULL AS reason, count(*) AS rows FROM candidates
  UNION ALL SELECT 2, 'extraction rejected', reason, count(*) FROM candidate_rejects GROUP BY reason
  UNION ALL SELECT 3, 'filter dropped', reason, count(*) FROM filtered WHERE NOT ok GROUP BY reason
  UNION ALL SELECT 4, 'filter kept', NULL, count(*) FROM filtered WHERE ok
  UNION ALL SELECT 5, 'matched', NULL, count(*) FROM matched
  UNION ALL SELECT 6, 'download ' || status, reason, count(*) FROM downloads GROUP BY status, reason
  UNION ALL SELECT 7, 'dedup ' || CASE WHEN keep THEN 'kept' ELSE 'removed' END, reason, count(*) FROM dedup GROUP BY keep, reason
  UNION ALL SELECT 8, 'balance ' || CASE WHEN keep THEN 'kept' ELSE 'dropped' END, NULL, count(*) FROM balanced GROUP BY keep
  UNION ALL SELECT 9, 'sharded', NULL, count(*) FROM shards
)
ORDER BY stage, step, rows DESC, reason
