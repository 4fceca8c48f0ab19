"""Plain descriptions shared by the lifecycle and its drivers: a system (`system`), the hardware
(`hardware`), the time model's contract (`timemodel`). They import neither `sim` nor `real`, so
`core` can use them while staying independent of both drivers."""
