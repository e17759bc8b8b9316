-- Download failures by reason and by domain.
-- The domain is the URL's host: an IPv6 literal without its brackets ([2001:db8::1] -> 2001:db8::1),
-- an international name in its IDNA form (as the URL is stored), never the port.
SELECT status, reason,
       coalesce(nullif(regexp_extract(url, '^[A-Za-z][A-Za-z0-9+.-]*://\[([^\]/]+)\]', 1), ''),
                regexp_extract(url, '^[A-Za-z][A-Za-z0-9+.-]*://([^/:?#\[]+)', 1)) AS domain,
       count(*) AS samples
FROM downloads WHERE status != 'success'
GROUP BY ALL ORDER BY samples DESC LIMIT 20
