-- Open reservations now live in the memory of the process that owns the file, and never in the
-- database: a restart releases every open reservation by construction, and accounts.balance is
-- always credited - settled.
--
-- The reservations table stays, always empty, for the tools that read the file; a reservation
-- left open by an earlier build is released here, as a restart releases it.

UPDATE accounts
SET balance = balance + (SELECT sum(amount) FROM reservations WHERE account_id = accounts.id)
WHERE id IN (SELECT account_id FROM reservations);

DELETE FROM reservations;

CREATE TRIGGER reservations_in_memory BEFORE INSERT ON reservations
BEGIN
    SELECT RAISE(ABORT, 'open reservations are kept in memory');
END;
