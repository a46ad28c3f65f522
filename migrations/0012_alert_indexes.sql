-- Chaperone collector: lookups of events and deliveries by incident (the API's alert listing
-- counts deliveries per incident; retention deletes a resolved incident's events and
-- deliveries).
CREATE INDEX alert_events_incident ON alert_events (incident_id);
CREATE INDEX alert_deliveries_incident ON alert_deliveries (incident_id);
CREATE INDEX alert_deliveries_event ON alert_deliveries (event_id);
