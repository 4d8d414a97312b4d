"""The embedded default corpus: fictitious personal records, e-mails and short letters, generated offline.

Deterministic for a seed, a few MB in about a second. Every person, address, phone number and e-mail address is
invented from small word lists, with enough recurring structure (field names, salutations, formats) for a small LM to
learn and enough variety (names x streets x numbers) for memorisation to be measurable.
"""

from __future__ import annotations

import random

from datasets import Dataset

FIRST = ("Ada Alan Alice Amara Anton Arjun Astrid Beatrix Bruno Camille Carlos Celia Chen Clara Dara Dmitri Edith "
         "Elena Emil Erik Esme Farah Felix Fiona Gareth Greta Hana Hugo Ines Ingrid Ivan Jada Jonas Julia Kai Kamal "
         "Karin Lars Leila Leo Lina Luca Magnus Maya Mei Milo Nadia Nico Nina Noor Olga Omar Oskar Paula Pedro Priya "
         "Quinn Rafael Rosa Ruth Sami Sara Selim Sofia Stefan Tara Theo Tomas Uma Vera Viktor Wren Yara Yusuf Zara "
         "Zoe").split()
LAST = ("Abbott Adeyemi Alvarez Andersen Bauer Becker Bianchi Brennan Castillo Chandra Costa Dalton Dubois Eriksen "
        "Falk Ferreira Fischer Garcia Gupta Hale Hansen Ibrahim Ivanova Jensen Kaur Keller Kowalski Larsen Lindqvist "
        "Mahler Marsh Moreau Nakamura Novak Okafor Olsen Ortega Park Petrov Quist Rahman Ricci Rossi Sato Schmidt "
        "Silva Sorensen Tanaka Thorne Ueda Varga Vidal Weber Whitlock Xu Yamada Young Zhang Zimmer").split()
STREETS = ("Elm Oak Birch Willow Cedar Maple Harbour Mill Church Station Market Quarry Orchard Heather Juniper "
           "Lantern Meadow Foundry Copper Falcon Rowan Thistle Bramble Kestrel Linden").split()
STREET_KINDS = ("Street", "Road", "Lane", "Avenue", "Close", "Way", "Terrace", "Place", "Gardens", "Row")
CITIES = ("Northwick", "Eastmere", "Ashford Vale", "Brightwater", "Carnholm", "Dunmore", "Fenwick", "Glenrock",
          "Hollowby", "Kingsreach", "Lowmoor", "Marrowgate", "Newhaven Cross", "Oakhurst", "Pellworth", "Redcliff",
          "Silverton", "Thornbury", "Westerly", "Yarrowfield")
DOMAINS = ("mailbox.test", "example.org", "postal.example", "inbox.invalid", "letters.example.net", "corp.example")
COMPANIES = ("Aldergrove Ltd", "Brightline Logistics", "Copperleaf Studio", "Driftwood Analytics", "Evergreen Dental",
             "Foxglove Bakery", "Granite Insurance", "Harbourlight Books", "Ironbridge Works", "Juniper Health",
             "Kestrel Engineering", "Lumen Legal", "Meridian Travel", "Northstar Energy", "Orchard Veterinary")
JOBS = ("nurse", "teacher", "accountant", "electrician", "software developer", "pharmacist", "architect", "chef",
        "librarian", "translator", "paramedic", "civil engineer", "florist", "photographer", "plumber", "designer")
ITEMS = ("the invoice", "the lease renewal", "the parcel", "the insurance claim", "the booking", "the prescription",
         "the repair quote", "the library card", "the membership form", "the tax statement", "the school report")
ACTIONS = ("arrived on", "was sent on", "is due on", "was approved on", "will be ready on", "was cancelled on")
MONTHS = ("January February March April May June July August September October November December").split()
TOPICS = ("Meeting on {day} {month}", "Your order {num}", "Change of address", "Appointment reminder",
          "Re: {item}", "Quick question about {item}", "Invoice {num}", "Holiday plans", "Account update")
SENTENCES = (
    "I am writing about {item}, which {action} {day} {month}.",
    "Could you call me back on {phone} when you have a moment?",
    "My new address is {address}.",
    "Please send the documents to {email} before {day} {month}.",
    "The amount of {amount} has been paid in full.",
    "We met at {company} last {month}, if you remember.",
    "I would like to move the appointment to {weekday} at {hour}:{minute}.",
    "{first} said that {item} {action} {day} {month}.",
    "Thank you for your help with {item}.",
    "Let me know if {weekday} works for you.",
    "I have attached a copy of {item} for your records.",
    "You can also reach {first} at {email} or on {phone}.",
)
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
KINDS = ("record", "email", "letter")


class _Gen:
    """Draws the fields of one fictitious world from a seeded `random.Random`."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def name(self) -> tuple[str, str]:
        return self.r.choice(FIRST), self.r.choice(LAST)

    def phone(self) -> str:
        r = self.r
        fmt = r.randrange(3)
        if fmt == 0:
            return f"+44 {r.randint(20, 79)} {r.randint(1000, 9999)} {r.randint(1000, 9999)}"
        if fmt == 1:
            return f"({r.randint(200, 989)}) {r.randint(200, 999)}-{r.randint(1000, 9999)}"
        return f"0{r.randint(100, 999)} {r.randint(100, 999)} {r.randint(100, 999)}"

    def email(self, first: str, last: str) -> str:
        r = self.r
        user = r.choice((f"{first}.{last}", f"{first[0]}{last}", f"{first}{r.randint(1, 99)}", f"{last}.{first[0]}"))
        return f"{user.lower()}@{r.choice(DOMAINS)}"

    def address(self) -> str:
        r = self.r
        postcode = f"{r.choice('ABCDEFGHKLMNPRSTW')}{r.choice('ABCDEFGHKLMNPRSTW')}{r.randint(1, 19)} " \
                   f"{r.randint(1, 9)}{r.choice('ABDEFGHJLNPQRSTUWXYZ')}{r.choice('ABDEFGHJLNPQRSTUWXYZ')}"
        return f"{r.randint(1, 240)} {r.choice(STREETS)} {r.choice(STREET_KINDS)}, {r.choice(CITIES)} {postcode}"

    def fill(self, template: str) -> str:
        r = self.r
        first, last = self.name()
        return template.format(
            item=r.choice(ITEMS), action=r.choice(ACTIONS), day=r.randint(1, 28), month=r.choice(MONTHS),
            phone=self.phone(), address=self.address(), email=self.email(first, last), first=first,
            amount=f"£{r.randint(5, 2500)}.{r.randint(0, 99):02d}", company=r.choice(COMPANIES),
            weekday=r.choice(WEEKDAYS), hour=r.randint(8, 18), minute=r.choice(("00", "15", "30", "45")),
            num=r.randint(10000, 99999))

    def body(self, lo: int, hi: int) -> str:
        return " ".join(self.fill(self.r.choice(SENTENCES)) for _ in range(self.r.randint(lo, hi)))

    def record(self) -> str:
        r = self.r
        first, last = self.name()
        return (f"Name: {first} {last}\nDate of birth: {r.randint(1940, 2005)}-{r.randint(1, 12):02d}-"
                f"{r.randint(1, 28):02d}\nAddress: {self.address()}\nPhone: {self.phone()}\n"
                f"Email: {self.email(first, last)}\nOccupation: {r.choice(JOBS)} at {r.choice(COMPANIES)}\n")

    def email_doc(self) -> str:
        (f1, l1), (f2, l2) = self.name(), self.name()
        greeting = self.r.choice(("Hi", "Hello", "Dear", "Good morning"))
        closing = self.r.choice(("Best", "Thanks", "Kind regards", "Cheers"))
        return (f"From: {f1} {l1} <{self.email(f1, l1)}>\nTo: {f2} {l2} <{self.email(f2, l2)}>\n"
                f"Subject: {self.fill(self.r.choice(TOPICS))}\n\n{greeting} {f2},\n\n{self.body(2, 4)}\n\n"
                f"{closing},\n{f1}\n{self.phone()}\n")

    def letter(self) -> str:
        (f1, l1), (_, l2) = self.name(), self.name()
        title = self.r.choice(("Mr", "Ms", "Dr", "Mx"))
        return (f"{self.address()}\n{self.r.randint(1, 28)} {self.r.choice(MONTHS)} {self.r.randint(2015, 2024)}\n\n"
                f"Dear {title} {l2},\n\n{self.body(3, 5)}\n\nYours sincerely,\n{f1} {l1}\n{self.phone()}\n")

    def document(self) -> tuple[str, str]:
        kind = self.r.choice(KINDS)
        text = self.record() if kind == "record" else self.email_doc() if kind == "email" else self.letter()
        return kind, text


def synthetic_corpus(size_bytes: int = 2_000_000, *, seed: int = 0) -> list[str]:
    """Documents whose UTF-8 sizes add up to at least `size_bytes` (deterministic for `seed`)."""
    return synthetic_dataset(size_bytes, seed=seed)["text"]


def synthetic_dataset(size_bytes: int = 2_000_000, *, seed: int = 0) -> Dataset:
    """The synthetic corpus as a `Dataset` with columns `text` and `kind` (record, email, letter)."""
    if size_bytes <= 0:
        raise ValueError(f"size_bytes={size_bytes}; ask for a positive size")
    gen, texts, kinds, total = _Gen(seed), [], [], 0
    while total < size_bytes:
        kind, text = gen.document()
        texts.append(text)
        kinds.append(kind)
        total += len(text.encode("utf-8"))
    return Dataset.from_dict({"text": texts, "kind": kinds})
