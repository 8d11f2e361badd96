-- Sample data for `cargo xtask demo` and the end-to-end tests. Every value
-- is invented; the SSNs use the 9xx area, which is never issued, and the
-- cards are Luhn-valid test numbers.
DROP TABLE IF EXISTS orders;
DROP TABLE IF EXISTS customers;

CREATE TABLE customers (
    id     integer PRIMARY KEY,
    name   text NOT NULL,
    email  text UNIQUE,
    ssn    text,
    card   text,
    phone  text,
    tier   text
);

INSERT INTO customers VALUES
 (1, 'Ada Lovelace',    'ada.l@example.org',    '900-12-3456', '4111111111111111', '+1-202-555-0101', 'gold'),
 (2, 'Alan Turing',     'alan.t@example.net',   '900-23-4567', '5555555555554444', '+1-202-555-0102', 'silver'),
 (3, 'Grace Hopper',    'grace.h@example.com',  '900-34-5678', '4012888888881881', '+1-202-555-0103', 'gold'),
 (4, 'Edsger Dijkstra', 'edsger.d@example.org', '900-45-6789', '378282246310005',  '+1-202-555-0104', 'bronze');

CREATE TABLE orders (
    id          integer PRIMARY KEY,
    customer_id integer REFERENCES customers(id),
    amount      numeric(10,2) NOT NULL,
    placed_at   timestamptz NOT NULL DEFAULT '2026-01-01 12:00:00+00',
    note        text
);
INSERT INTO orders (id, customer_id, amount, note) VALUES
 (10, 1, 19.99, 'first'), (11, 1, 5.00, NULL), (12, 3, 120.50, 'bulk'), (13, 2, 42.00, 'gift');

GRANT SELECT, INSERT, UPDATE, DELETE ON customers, orders TO PUBLIC;
