import unittest

from calculator import add, average


class CalculatorTest(unittest.TestCase):
    def test_add(self) -> None:
        self.assertEqual(add(2, 3), 5)

    def test_average(self) -> None:
        self.assertEqual(average([2, 4, 6]), 4)

    def test_average_of_one_value(self) -> None:
        self.assertEqual(average([7]), 7)

    def test_average_of_nothing_is_an_error(self) -> None:
        with self.assertRaises(ValueError):
            average([])


if __name__ == "__main__":
    unittest.main()
