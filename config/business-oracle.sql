-- The example business tables at an Oracle site (see config/business.sql for
-- PostgreSQL). An application writes a change and its outbox row in one
-- transaction, for example:
--
--   MERGE INTO customer t USING (SELECT 7 id FROM dual) s ON (t.id = s.id)
--     WHEN MATCHED THEN UPDATE SET name = 'Zoé', city = 'Madrid', updated_at = SYSTIMESTAMP
--     WHEN NOT MATCHED THEN INSERT (id, name, city, updated_at) VALUES (7, 'Zoé', 'Madrid', SYSTIMESTAMP);
--   INSERT INTO outbox (type, entity_key, data)
--     VALUES ('customer.upsert', '7', '{"id": 7, "name": "Zoé", "city": "Madrid", "updated_at": "2026-11-23T10:00:00Z"}');
--   COMMIT;
CREATE TABLE customer (
    id NUMBER(10) PRIMARY KEY,
    name VARCHAR2(200) NOT NULL,
    city VARCHAR2(200),
    updated_at TIMESTAMP(6) WITH TIME ZONE NOT NULL
);
CREATE TABLE orders (
    id NUMBER(10) PRIMARY KEY,
    customer_id NUMBER(10) NOT NULL,
    amount NUMBER(10,2) NOT NULL,
    status VARCHAR2(40) NOT NULL
);
