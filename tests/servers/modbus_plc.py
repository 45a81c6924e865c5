#!/usr/bin/env python3
"""A PLC for the end-to-end tests: a pymodbus TCP server (not our code) that plays rows of
machine values through a register map, one row per poll, as a PLC shows a machine's values.

    modbus_plc.py PLAN.json

PLAN is JSON:
    {"port": 5020, "unit_id": 1,
     "registers": [{"table": "holding", "address": 0, "type": "f32", "word_order": "big",
                    "byte_order": "big", "scale": 1.0, "offset": 0.0}, ...],
     "rows": [[one value per register], ...],
     "faults": {"<row>": "nan" | "inf" | "stall" | "exception"},
     "stall_secs": 3.0,
     "start_row": 0,
     "loop": false}

A read of holding register 0 (the agent reads the holding table first in every poll) shows
the next row in every table; the other reads of that poll see the same row. A row's fault is
played when the row is shown: "nan"/"inf" put that value in its first register, "stall"
answers after stall_secs, "exception" answers exception 2 once and shows the row on the next
poll. After the last row every read is answered with exception 2 (illegal
data address), as a PLC whose data block went away would. Each row shown and each fault
played is printed, so the test knows where the PLC is (and where a restarted one resumes), and
so is each client connection.
"""

import asyncio
import json
import math
import struct
import sys

from pymodbus.datastore import ModbusServerContext, ModbusSlaveContext
from pymodbus.server import ModbusTcpServer

FORMATS = {"u16": ">H", "i16": ">h", "u32": ">I", "i32": ">i", "f32": ">f", "f64": ">d", "bool": ">H"}
TABLES = {"holding": "h", "input": "i", "coil": "c", "discrete": "d"}
FUNCTIONS = {3: "h", 4: "i", 1: "c", 2: "d"}


def words(register, value):
    """The register words that read back as `value` under the agent's decoding."""
    kind = register["type"]
    raw = (value - register.get("offset", 0.0)) / register.get("scale", 1.0)
    if kind in ("u16", "i16", "u32", "i32"):
        raw = int(round(raw))
    elif kind == "bool":
        raw = 1 if raw else 0
    data = struct.pack(FORMATS[kind], raw)
    ws = [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]
    if register.get("word_order", "big") == "little":
        ws.reverse()
    if register.get("byte_order", "big") == "little":
        ws = [((w & 0xFF) << 8) | (w >> 8) for w in ws]
    return ws


class Plc(ModbusSlaveContext):
    def __init__(self, plan):
        super().__init__()
        self.plan = plan
        self.next_row = plan.get("start_row", 0)
        self.shown = None
        self.cells = {t: {} for t in TABLES.values()}
        self.exceptions_played = set()
        self.ended = False

    def show(self, index):
        row = self.plan["rows"][index]
        fault = self.plan.get("faults", {}).get(str(index))
        for n, (register, value) in enumerate(zip(self.plan["registers"], row)):
            if n == 0 and fault in ("nan", "inf"):
                value = math.nan if fault == "nan" else math.inf
            table = self.cells[TABLES[register.get("table", "holding")]]
            if register.get("table") in ("coil", "discrete"):
                table[register["address"]] = bool(value)
                continue
            for i, w in enumerate(words(register, value)):
                table[register["address"] + i] = w
        self.shown = index
        if not self.plan.get("loop"):
            print(f"row {index}" + (f" {fault}" if fault else ""), flush=True)

    def validate(self, fc_as_hex, address, count=1):
        """False answers exception 2 (illegal data address): past the last row, and once for
        a row whose fault is "exception"."""
        if fc_as_hex not in FUNCTIONS:
            return False
        if fc_as_hex == 3 and address == 0:
            index = self.next_row
            if index >= len(self.plan["rows"]) and self.plan.get("loop"):
                self.next_row = index = 0
            if index >= len(self.plan["rows"]):
                if not self.ended:
                    print("end of rows", flush=True)
                self.ended = True
                return False
            fault = self.plan.get("faults", {}).get(str(index))
            if fault == "exception" and index not in self.exceptions_played:
                self.exceptions_played.add(index)
                print(f"exception before row {index}", flush=True)
                return False
            return True
        return self.shown is not None and not self.ended

    async def async_getValues(self, fc_as_hex, address, count=1):
        if fc_as_hex == 3 and address == 0:
            index = self.next_row
            self.next_row += 1
            self.show(index)
            if self.plan.get("faults", {}).get(str(index)) == "stall":
                await asyncio.sleep(self.plan.get("stall_secs", 3.0))
        table = self.cells[FUNCTIONS[fc_as_hex]]
        default = False if fc_as_hex in (1, 2) else 0
        return [table.get(address + i, default) for i in range(count)]


class Server(ModbusTcpServer):
    def callback_new_connection(self):
        print("client connected", flush=True)
        return super().callback_new_connection()


async def main():
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    context = ModbusServerContext(slaves={plan.get("unit_id", 1): Plc(plan)}, single=False)
    print(f"listening on {plan['port']}", flush=True)
    await Server(context, address=("127.0.0.1", plan["port"])).serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
