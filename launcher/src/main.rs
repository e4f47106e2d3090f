fn main() { println!("{}", std::any::type_name::<kd_engine::burn::backend::Flex>()); }
