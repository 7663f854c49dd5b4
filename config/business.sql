-- The example business tables the shipped connectors route events into
-- (the same as `sitesync demo`). An application writes a change and its
-- outbox row in one transaction, for example:
--
--   BEGIN;
--   INSERT INTO customer (id, name, city, updated_at) VALUES (7, 'Zoé', 'Paris', now())
--       ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, city = EXCLUDED.city, updated_at = EXCLUDED.updated_at;
--   INSERT INTO outbox (type, entity_key, data)
--       VALUES ('customer.upsert', '7', '{"id": 7, "name": "Zoé", "city": "Paris", "updated_at": "2026-11-23T10:00:00Z"}');
--   COMMIT;
CREATE TABLE IF NOT EXISTS customer (
    id int PRIMARY KEY,
    name text NOT NULL,
    city text,
    updated_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS orders (
    id int PRIMARY KEY,
    customer_id int NOT NULL,
    amount numeric(10,2) NOT NULL,
    status text NOT NULL
);
