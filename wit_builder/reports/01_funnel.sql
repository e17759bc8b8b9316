-- The funnel: rows at each stage, with the drop reasons.
SELECT 'candidates' AS step, NULL AS reason, count(*) AS rows FROM candidates
UNION ALL SELECT 'extraction rejected', reason, count(*) FROM candidate_rejects GROUP BY reason
UNION ALL SELECT 'filter dropped', reason, count(*) FROM filtered WHERE NOT ok GROUP BY reason
UNION ALL SELECT 'filter kept', NULL, count(*) FROM filtered WHERE ok
UNION ALL SELECT 'matched', NULL, count(*) FROM matched
UNION ALL SELECT 'download ' || status, reason, count(*) FROM downloads GROUP BY status, reason
UNION ALL SELECT 'dedup ' || CASE WHEN keep THEN 'kept' ELSE 'removed' END, reason, count(*) FROM dedup GROUP BY keep, reason
UNION ALL SELECT 'balance ' || CASE WHEN keep THEN 'kept' ELSE 'dropped' END, NULL, count(*) FROM balanced GROUP BY keep
UNION ALL SELECT 'sharded', NULL, count(*) FROM shards
ORDER BY step, rows DESC
